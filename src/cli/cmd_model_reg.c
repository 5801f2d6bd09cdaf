/*
 * `fleetml model push | versions | approve | reject | deploy`: the model
 * registry from the command line, on a node's data directory (the
 * platform's own versions: no tenant owns them). Wiring only: the rules are
 * in src/model/registry.c and the store.
 */
#include "cli/cli.h"
#include "fleetml/modelreg.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#define ACTOR "cli"

static void audit(fm_store *st, const char *tenant, const char *action, const char *target,
                  const char *details)
{
    fm_audit a = {.at_ms = fm_wall_ms(), .tenant = tenant, .actor = ACTOR, .action = action,
                  .target = target, .outcome = "ok", .client = "", .details_json = details};
    fm_errbuf err;
    if (fm_store_audit_append(st, &a, &err) != 0)
        fprintf(stderr, "fleetml model: audit entry not stored: %s\n", err.msg);
}

static int open_store(int *argc, char **argv, fm_config *cfg, fm_store **st)
{
    int rc = fm_cli_config(argc, argv, cfg);
    if (rc)
        return rc;
    fm_errbuf err;
    if (fm_store_open(cfg, st, &err) != 0) {
        fprintf(stderr, "fleetml model: %s\n", err.msg);
        return 1;
    }
    return 0;
}


int fm_cmd_model_push(int argc, char **argv)
{
    fm_config cfg;
    fm_store *st = NULL;
    const char *manifest_path = fm_cli_take_opt(&argc, argv, "--manifest");
    int rc = open_store(&argc, argv, &cfg, &st);
    if (rc)
        return rc;
    if (argc != 2) {
        fm_store_close(st);
        return fm_cli_usage_error("model push", "name one model directory");
    }
    char path[4096];
    char *manifest = NULL, *file = NULL, *mlmodel = NULL;
    size_t mlen = 0, flen = 0, mmlen = 0;
    fm_errbuf err;
    snprintf(path, sizeof path, "%s/MLmodel", argv[1]);
    rc = fm_read_file(path, &mlmodel, &mmlen);
    bool mlflow = rc == 0;
    fm_mlflow_model mm;
    if (mlflow && fm_mlflow_parse(mlmodel, mmlen, &mm, &err) != 0) {
        fprintf(stderr, "fleetml model push: %s\n", err.msg);
        fm_free(mlmodel);
        fm_store_close(st);
        return 1;
    }
    if (manifest_path)
        snprintf(path, sizeof path, "%s", manifest_path);
    else
        snprintf(path, sizeof path, "%s/manifest.json", argv[1]);
    rc = fm_read_file(path, &manifest, &mlen);
    if (!rc && mlflow) {
        snprintf(path, sizeof path, "%s/%s", argv[1], mm.data);
        rc = fm_read_file(path, &file, &flen);
    } else if (!rc) {
        snprintf(path, sizeof path, "%s/model.json", argv[1]);
        rc = fm_read_file(path, &file, &flen);
        if (rc == FM_ENOTFOUND) {
            snprintf(path, sizeof path, "%s/model.ubj", argv[1]);
            rc = fm_read_file(path, &file, &flen);
        }
    }
    if (rc) {
        fprintf(stderr, "fleetml model push: %s: %s\n", path, fm_strerror(rc));
        fm_free(manifest);
        fm_free(mlmodel);
        fm_store_close(st);
        return 1;
    }
    if (mlflow && fm_mlflow_join(mlmodel, mmlen, &manifest, &mlen, &err) != 0) {
        fprintf(stderr, "fleetml model push: %s\n", err.msg);
        fm_free(manifest);
        fm_free(mlmodel);
        fm_free(file);
        fm_store_close(st);
        return 1;
    }
    fm_free(mlmodel);
    /* The name comes from the manifest; push validates that it is one. */
    json_t *man = json_loadb(manifest, mlen, 0, NULL);
    char name[65] = "";
    const char *n = json_string_value(json_object_get(man, "name"));
    snprintf(name, sizeof name, "%s", n ? n : "");
    json_decref(man);
    fm_model_upload u = {.name = name, .manifest = manifest, .manifest_len = mlen,
                         .file = file, .file_len = flen, .owner_tenant = "", .actor = ACTOR,
                         .now_ms = fm_wall_ms()};
    fm_model_rec v;
    rc = fm_modelreg_push(st, &cfg, &u, &v, &err);
    fm_free(manifest);
    fm_free(file);
    if (rc) {
        fprintf(stderr, "fleetml model push: %s\n", err.msg);
        fm_store_close(st);
        return 1;
    }
    char details[160];
    snprintf(details, sizeof details, "{\"version\":\"%s\",\"sha256\":\"%s\"}", v.version,
             v.sha256);
    audit(st, "", "model.upload", v.name, details);
    printf("%s@%s pending (%s, %lld bytes, sha256 %s)\n", v.name, v.version, v.format,
           (long long)v.size, v.sha256);
    fm_store_close(st);
    return 0;
}

typedef struct vlist {
    const char *name;        /* only this model's aliases (NULL: all) */
    json_t *versions, *aliases; /* --json */
} vlist;

static int print_version(void *ud, const fm_model_rec *v)
{
    vlist *l = ud;
    if (l->versions)
        return json_array_append_new(l->versions, fm_model_version_json(v, false));
    char at[40];
    printf("%-16s %-12s %-9s %-4s %10lld  %s  %s\n", v->name, v->version,
           fm_model_status_name(v->status), v->format, (long long)v->size,
           fm_rfc3339(v->created_ms, at, sizeof at),
           v->owner_tenant[0] ? v->owner_tenant : "(platform)");
    return 0;
}

static int print_alias(void *ud, const fm_model_alias *a)
{
    vlist *l = ud;
    if (l->name && strcmp(a->name, l->name) != 0)
        return 0;
    if (l->aliases) {
        json_t *o = fm_model_alias_json(a);
        if (o)
            json_object_set_new(o, "model", json_string(a->name));
        return json_array_append_new(l->aliases, o);
    }
    printf("%-20s %-16s %-10s -> %s", a->tenant, a->name, a->alias, a->version);
    if (strcmp(a->alias, FM_ALIAS_CANARY) == 0)
        printf(" (%d%% of devices)", a->share_pct);
    printf("\n");
    return 0;
}

int fm_cmd_model_versions(int argc, char **argv)
{
    fm_config cfg;
    fm_store *st;
    bool as_json = fm_cli_take_flag(&argc, argv, "--json");
    int rc = open_store(&argc, argv, &cfg, &st);
    if (rc)
        return rc;
    if (argc > 2) {
        fm_store_close(st);
        return fm_cli_usage_error("model versions", "unexpected argument '%s'", argv[2]);
    }
    vlist l = {.name = argc == 2 ? argv[1] : NULL};
    if (as_json) {
        l.versions = json_array();
        l.aliases = json_array();
    }
    rc = st->models->version_list(st, l.name, print_version, &l);
    if (!rc && !as_json)
        printf("deployments:\n");
    if (!rc)
        rc = st->models->alias_list(st, NULL, print_alias, &l);
    fm_store_close(st);
    if (rc) {
        json_decref(l.versions);
        json_decref(l.aliases);
        fprintf(stderr, "fleetml model versions: %s\n", fm_strerror(rc));
        return 1;
    }
    if (as_json)
        return fm_cli_print_json(
            json_pack("{s:o,s:o}", "versions", l.versions, "deployments", l.aliases));
    return 0;
}

int fm_cmd_model_decide(int argc, char **argv, int status)
{
    fm_config cfg;
    fm_store *st = NULL;
    const char *what = status == FM_MODEL_APPROVED ? "approve" : "reject";
    const char *note = fm_cli_take_opt(&argc, argv, "--note");
    int rc = open_store(&argc, argv, &cfg, &st);
    if (rc)
        return rc;
    if (argc != 3) {
        fm_store_close(st);
        return fm_cli_usage_error(status == FM_MODEL_APPROVED ? "model approve" : "model reject",
                                  "name the model and the version");
    }
    fm_errbuf err;
    rc = st->models->version_decide(st, argv[1], argv[2], status, ACTOR, note ? note : "",
                                    fm_wall_ms(), &err);
    if (rc) {
        fprintf(stderr, "fleetml model %s: %s\n", what, err.msg);
        fm_store_close(st);
        return 1;
    }
    char details[96];
    snprintf(details, sizeof details, "{\"version\":\"%s\"}", argv[2]);
    audit(st, "", status == FM_MODEL_APPROVED ? "model.approve" : "model.reject", argv[1],
          details);
    printf("%s@%s %s\n", argv[1], argv[2], fm_model_status_name(status));
    fm_store_close(st);
    return 0;
}

int fm_cmd_model_deploy(int argc, char **argv)
{
    fm_config cfg;
    fm_store *st = NULL;
    const char *tenant = fm_cli_take_opt(&argc, argv, "--tenant");
    const char *alias = fm_cli_take_opt(&argc, argv, "--alias");
    const char *share_s = fm_cli_take_opt(&argc, argv, "--share");
    int remove = fm_cli_take_flag(&argc, argv, "--remove");
    int rc = open_store(&argc, argv, &cfg, &st);
    if (rc)
        return rc;
    if (!alias)
        alias = FM_ALIAS_PRODUCTION;
    uint64_t share = 100;
    bool canary = strcmp(alias, FM_ALIAS_CANARY) == 0;
    if (argc != (remove ? 2 : 3) || !tenant || !fm_modelreg_alias_valid(alias) ||
        (share_s && (!canary || fm_cli_parse_u64(share_s, 100, &share) != 0 || share == 0))) {
        fm_store_close(st);
        return fm_cli_usage_error("model deploy",
                                  "NAME VERSION --tenant T, or NAME --remove --tenant T; --alias "
                                  "production, canary or shadow; --share 1..100 for a canary");
    }
    fm_model_alias a = {.share_pct = canary ? (int)share : 100, .updated_ms = fm_wall_ms()};
    snprintf(a.tenant, sizeof a.tenant, "%s", tenant);
    snprintf(a.name, sizeof a.name, "%s", argv[1]);
    snprintf(a.alias, sizeof a.alias, "%s", alias);
    snprintf(a.version, sizeof a.version, "%s", remove ? "" : argv[2]);
    snprintf(a.updated_by, sizeof a.updated_by, "%s", ACTOR);
    fm_errbuf err;
    if (!remove && canary && !share_s) {
        fprintf(stderr, "fleetml model deploy: a canary needs --share (percent of devices)\n");
        fm_store_close(st);
        return 2;
    }
    rc = st->models->alias_set(st, &a, &err);
    if (rc) {
        fprintf(stderr, "fleetml model deploy: %s\n", err.msg);
        fm_store_close(st);
        return 1;
    }
    char details[160];
    snprintf(details, sizeof details, "{\"alias\":\"%s\",\"version\":\"%s\",\"share_pct\":%d}",
             a.alias, a.version, a.share_pct);
    audit(st, tenant, "model.deploy", a.name, details);
    if (remove)
        printf("%s: %s %s removed\n", tenant, a.name, a.alias);
    else
        printf("%s: %s %s -> %s%s\n", tenant, a.name, a.alias, a.version,
               canary ? " (canary)" : "");
    fm_store_close(st);
    return 0;
}

static void show_progress(void *ud, const char *phase, int pct)
{
    (void)ud;
    fm_cli_progress(phase, pct);
}

int fm_cmd_model_train_lake(int argc, char **argv)
{
    fm_config cfg;
    fm_store *st = NULL;
    const char *version = fm_cli_take_opt(&argc, argv, "--version");
    const char *tenant = fm_cli_take_opt(&argc, argv, "--tenant");
    const char *from = fm_cli_take_opt(&argc, argv, "--from");
    const char *to = fm_cli_take_opt(&argc, argv, "--to");
    int rc = open_store(&argc, argv, &cfg, &st);
    if (rc)
        return rc;
    fm_lake_train_opts o = {.version = version, .tenant = tenant, .owner_tenant = "",
                            .actor = ACTOR, .progress = show_progress};
    if (argc != 1 || !version || (from && fm_rfc3339_parse(from, &o.from_ms) != 0) ||
        (to && fm_rfc3339_parse(to, &o.to_ms) != 0)) {
        fm_store_close(st);
        return fm_cli_usage_error("model train",
                                  "--from-lake needs --version V; --from and --to are RFC 3339 "
                                  "times");
    }
    fm_model *base = NULL;
    fm_errbuf err;
    if (fm_model_load(cfg.model_dir, &base, &err) != 0) {
        fprintf(stderr, "fleetml model train: %s\n", err.msg);
        fm_store_close(st);
        return 1;
    }
    char name[65];
    snprintf(name, sizeof name, "%s", fm_model_name(base));
    o.name = name;
    fm_lake_train_report r;
    rc = fm_model_train_lake(&cfg, st, &o, &r, &err);
    if (rc) {
        fprintf(stderr, "fleetml model train: %s\n", err.msg);
        fm_model_free(base);
        fm_store_close(st);
        return 1;
    }
    char details[200];
    snprintf(details, sizeof details, "{\"version\":\"%s\",\"source\":\"lake\"}", version);
    audit(st, "", "model.upload", name, details);
    printf("%s@%s pending: %zu labelled measurements of %zu (%zu devices; %zu train, %zu "
           "validation), best round %d\n",
           name, r.version.version, r.labelled, r.raw_rows, r.devices, r.train_rows, r.val_rows,
           r.best_round + 1);
    printf("%-22s %12s %12s %14s\n", "validation MAE", "new", r.prod_ref, "constant");
    for (size_t k = 0; k < 3; k++)
        printf("%-22s %12.4f %12.4f %14.4f\n", fm_model_output_at(base, k)->name, r.mae[k],
               r.prod_mae[k], r.const_mae[k]);
    /* Per tenant, from the manifest (the one place the figures live). */
    fm_model_rec v = {0};
    json_t *man = st->models->version_get(st, name, r.version.version, &v) == 0
                      ? json_loads(v.manifest_json, 0, NULL)
                      : NULL;
    fm_model_rec_clear(&v);
    const char *tn;
    json_t *t;
    json_object_foreach(json_object_get(json_object_get(man, "validation"), "per_tenant"), tn, t)
    {
        printf("tenant %s (%lld validation rows), MAE new / production:", tn,
               (long long)json_integer_value(json_object_get(t, "rows")));
        for (size_t k = 0; k < 3; k++) {
            const char *on = fm_model_output_at(base, k)->name;
            printf(" %s %.4f / %.4f", on,
                   json_number_value(json_object_get(
                       json_object_get(json_object_get(t, "metrics"), on), "mae")),
                   json_number_value(json_object_get(
                       json_object_get(json_object_get(t, "production"), on), "mae")));
        }
        printf("\n");
    }
    json_decref(man);
    fm_model_free(base);
    fm_store_close(st);
    return 0;
}
