/*
 * `fleetml model`: train the bundled model from the simulator and inspect
 * a model directory.
 */
#include "cli/cli.h"
#include "fleetml/model.h"
#include "fleetml/store.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_DIR "models/viscosity"
#define DEFAULT_SEED UINT64_C(20261126)
#define DEFAULT_ROWS 20000


static int parse_u64(const char *opt, const char *s, uint64_t *out)
{
    if (s && fm_cli_parse_u64(s, UINT64_MAX, out) == 0)
        return 0;
    fprintf(stderr, "fleetml model: %s expects a non-negative integer, got '%s'\n", opt,
            s ? s : "");
    return 2;
}

static int cmd_train(int argc, char **argv)
{
    if (fm_cli_take_flag(&argc, argv, "--from-lake"))
        return fm_cmd_model_train_lake(argc, argv);
    int synthetic = fm_cli_take_flag(&argc, argv, "--synthetic");
    const char *dir = fm_cli_take_opt(&argc, argv, "--out");
    const char *seed_s = fm_cli_take_opt(&argc, argv, "--seed");
    const char *rows_s = fm_cli_take_opt(&argc, argv, "--rows");
    const char *hold_s = fm_cli_take_opt(&argc, argv, "--holdout");
    if (argc > 1)
        return fm_cli_usage_error("model train", "unexpected argument '%s'", argv[1]);
    if (!synthetic)
        return fm_cli_usage_error("model train",
                                  "say where the data comes from: --synthetic or --from-lake");
    uint64_t seed = DEFAULT_SEED, rows = DEFAULT_ROWS, hold;
    if ((seed_s && parse_u64("--seed", seed_s, &seed)) ||
        (rows_s && parse_u64("--rows", rows_s, &rows)))
        return 2;
    hold = rows / 5;
    if (hold_s && parse_u64("--holdout", hold_s, &hold))
        return 2;
    if (!dir)
        dir = DEFAULT_DIR;

    fm_errbuf err;
    uint64_t t0 = fm_mono_ns();
    int rc = fm_model_train_synthetic(dir, seed, (size_t)rows, (size_t)hold, &err);
    if (rc) {
        fprintf(stderr, "fleetml model train: %s\n", err.msg);
        return 1;
    }
    printf("trained %s/model.json and manifest.json (seed %" PRIu64 ", %" PRIu64
           " training rows, %" PRIu64 " holdout rows) in %.1f s\n",
           dir, seed, rows, hold, (double)(fm_mono_ns() - t0) / 1e9);
    return 0;
}

static const char *str_or(json_t *v)
{
    const char *s = json_string_value(v);
    return s ? s : "?";
}

static void print_metrics(json_t *man)
{
    json_t *hold = json_object_get(man, "holdout");
    json_t *metrics = json_object_get(hold, "metrics");
    if (!json_is_object(metrics))
        return;
    printf("holdout:  %" JSON_INTEGER_FORMAT " rows\n",
           json_integer_value(json_object_get(hold, "rows")));
    const char *name;
    json_t *v;
    json_object_foreach(metrics, name, v) {
        printf("  %-22s rmse %-10.4g mae %-10.4g r2 %.4f\n", name,
               json_number_value(json_object_get(v, "rmse")),
               json_number_value(json_object_get(v, "mae")),
               json_number_value(json_object_get(v, "r2")));
    }
}

static int cmd_info(int argc, char **argv)
{
    const char *dir = fm_cli_take_opt(&argc, argv, "--dir");
    bool as_json = fm_cli_take_flag(&argc, argv, "--json");
    if (argc > 1)
        return fm_cli_usage_error("model info", "unexpected argument '%s'", argv[1]);
    if (!dir)
        dir = DEFAULT_DIR;

    /* Loading the model is the real check (manifest shape, feature list
     * against this build, booster readable); the raw manifest is read
     * only for the descriptive fields the runtime does not keep. */
    fm_errbuf err;
    fm_model *model = NULL;
    if (fm_model_load(dir, &model, &err) != 0) {
        fprintf(stderr, "fleetml model info: %s\n", err.msg);
        return 1;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    json_error_t je;
    json_t *man = json_load_file(path, 0, &je);
    if (as_json) {
        json_t *feats = json_array(), *outs = json_array();
        for (size_t i = 0; i < fm_feature_count(); i++)
            json_array_append_new(feats, json_string(fm_feature_name(i)));
        for (size_t i = 0; i < fm_model_output_count(model); i++) {
            const fm_model_output *o = fm_model_output_at(model, i);
            json_array_append_new(outs, json_pack("{s:s,s:s,s:f,s:f}", "name", o->name, "unit",
                                                  o->unit, "min", o->min, "max", o->max));
        }
        json_t *doc = json_pack("{s:s,s:s,s:s,s:o,s:o,s:O?,s:O?}", "dir", dir, "name",
                                fm_model_name(model), "version", fm_model_version(model),
                                "features", feats, "outputs", outs, "training",
                                json_object_get(man, "training"), "holdout",
                                json_object_get(man, "holdout"));
        json_decref(man);
        fm_model_free(model);
        return fm_cli_print_json(doc);
    }

    printf("model:    %s %s (%s)\n", fm_model_name(model), fm_model_version(model), dir);
    printf("kind:     %s\n", str_or(json_object_get(man, "kind")));
    printf("features: %zu:", fm_feature_count());
    for (size_t i = 0; i < fm_feature_count(); i++)
        printf(" %s", fm_feature_name(i));
    printf("\noutputs:\n");
    for (size_t i = 0; i < fm_model_output_count(model); i++) {
        const fm_model_output *o = fm_model_output_at(model, i);
        printf("  %-22s %-6s plausible %g..%g\n", o->name, o->unit, o->min, o->max);
    }
    json_t *tr = json_object_get(man, "training");
    if (json_is_object(tr))
        printf("training: %s (%s), seed %" JSON_INTEGER_FORMAT ", %" JSON_INTEGER_FORMAT
               " rows\n",
               str_or(json_object_get(tr, "source")),
               str_or(json_object_get(tr, "generator")),
               json_integer_value(json_object_get(tr, "seed")),
               json_integer_value(json_object_get(tr, "rows")));
    print_metrics(man);
    json_decref(man);
    fm_model_free(model);
    return 0;
}

int fm_cmd_model(int argc, char **argv)
{
    if (argc < 2)
        return fm_cli_usage_error("model", "name a subcommand");
    if (strcmp(argv[1], "train") == 0)
        return cmd_train(argc - 1, argv + 1);
    if (strcmp(argv[1], "info") == 0)
        return cmd_info(argc - 1, argv + 1);
    if (strcmp(argv[1], "push") == 0)
        return fm_cmd_model_push(argc - 1, argv + 1);
    if (strcmp(argv[1], "versions") == 0)
        return fm_cmd_model_versions(argc - 1, argv + 1);
    if (strcmp(argv[1], "approve") == 0)
        return fm_cmd_model_decide(argc - 1, argv + 1, FM_MODEL_APPROVED);
    if (strcmp(argv[1], "reject") == 0)
        return fm_cmd_model_decide(argc - 1, argv + 1, FM_MODEL_REJECTED);
    if (strcmp(argv[1], "deploy") == 0)
        return fm_cmd_model_deploy(argc - 1, argv + 1);
    return fm_cli_usage_error("model", "unknown subcommand '%s'", argv[1]);
}

const fm_cli_cmd fm_cli_model_cmds[] = {
    {.name = "model",
     .summary = "models: train, info, push, versions, approve, reject, deploy",
     .text = "docs/model.md describes the registry, deployments and training."},
    {.name = "model train",
     .summary = "train a model: on synthetic data, or from the lake's labels",
     .text = "--synthetic writes a model directory (the bundled model is made so).\n"
             "--from-lake trains on labelled measurements and registers a pending version.",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--synthetic", NULL, "train on simulated sweeps"},
              {"--out", "DIR", "where the model goes (--synthetic; default models/viscosity)"},
              {"--seed", "N", "the simulation's seed (--synthetic; default 20261126)"},
              {"--rows", "N", "training rows (--synthetic; default 20000)"},
              {"--holdout", "N", "held-out rows for the metrics (--synthetic; default rows/5)"},
              {"--from-lake", NULL, "train on the lake's labelled measurements"},
              {"--version", "V", "the version to register (--from-lake)"},
              {"--tenant", "T", "only this tenant's labels (--from-lake)"},
              {"--from", "TIME", "labels from this RFC 3339 time (--from-lake)"},
              {"--to", "TIME", "labels until this time (--from-lake)"}},
     .examples = {"fleetml model train --synthetic --out models/viscosity",
                  "fleetml model train --from-lake --version 1.1.0 --tenant st-mary"}},
    {.name = "model info",
     .summary = "a model directory: features, outputs, training, metrics",
     .opts = {{"--dir", "DIR", "the model directory (default: the bundled model)"},
              {"--json", NULL, "one JSON document"}},
     .examples = {"fleetml model info --dir models/viscosity --json"}},
    {.name = "model push",
     .args = "DIR",
     .summary = "register a model directory as a pending version",
     .text = "DIR holds manifest.json and model.json (or model.ubj), or is an MLflow model\n"
             "directory (MLmodel with the xgboost flavour; the manifest from\n"
             "DIR/manifest.json or --manifest).",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--manifest", "FILE", "the manifest of an MLflow directory"}},
     .examples = {"fleetml model push ./mlruns/0/abc123/artifacts/model --manifest manifest.json"}},
    {.name = "model versions",
     .args = "[NAME]",
     .summary = "versions with their status, and the deployments",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--json", NULL, "one JSON document: {\"versions\": [...], \"deployments\": [...]}"}},
     .examples = {"fleetml model versions viscosity --json"}},
    {.name = "model approve",
     .args = "NAME VERSION",
     .summary = "approve a pending version",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--note", "TEXT", "why (kept in the audit log)"}},
     .examples = {"fleetml model approve viscosity 1.1.0 --note \"validated on ward data\""}},
    {.name = "model reject",
     .args = "NAME VERSION",
     .summary = "reject a pending version",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--note", "TEXT", "why (kept in the audit log)"}},
     .examples = {"fleetml model reject viscosity 1.1.0 --note \"worse on low hematocrit\""}},
    {.name = "model deploy",
     .args = "NAME [VERSION]",
     .summary = "point a tenant's alias at an approved version, or remove it",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--tenant", "T", "the tenant (required)"},
              {"--alias", "A", "production (default), canary or shadow"},
              {"--share", "PCT", "a canary's share of devices, 1..100"},
              {"--remove", NULL, "remove the alias instead"}},
     .examples = {"fleetml model deploy viscosity 1.1.0 --tenant st-mary --alias canary --share 10"}},
    {.name = NULL},
};
