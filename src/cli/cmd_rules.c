/*
 * `fleetml rules` and `fleetml function`: the tenant's rules in the store
 * (the same checks as PUT /api/v1/rules/{name}), and this node's deployed
 * functions (fleetml/functions.h), with `function call` to try one on an
 * event from stdin.
 */
#include "cli/cli.h"
#include "fleetml/events.h"
#include "fleetml/functions.h"
#include "fleetml/json.h"
#include "fleetml/rules.h"

#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int print_rule(void *ud, const fm_rule_row *r)
{
    json_t *items = ud, *shown = fm_rule_row_json(r);
    if (!shown)
        return 0;
    if (items)
        return json_array_append_new(items, shown);
    printf("%-16s %-24s %-20s %-8s targets=%zu position=%lld\n", r->tenant, r->name,
           json_string_value(json_object_get(shown, "event")),
           json_is_true(json_object_get(shown, "enabled")) ? "enabled" : "disabled",
           json_array_size(json_object_get(shown, "targets")), (long long)r->position);
    json_decref(shown);
    return 0;
}

static int rules_list(fm_store *st, const char *tenant, bool as_json)
{
    json_t *items = as_json ? json_array() : NULL;
    if (fm_store_rule_list(st, tenant, NULL, print_rule, items) != 0) {
        json_decref(items);
        fprintf(stderr, "fleetml rules list: cannot read the rules\n");
        return 1;
    }
    return items ? fm_cli_print_json(json_pack("{s:o}", "items", items)) : 0;
}

static int rules_put(fm_store *st, const fm_config *cfg, const char *tenant, const char *file)
{
    json_error_t jerr;
    json_t *doc = strcmp(file, "-") == 0 ? json_loadf(stdin, 0, &jerr) : json_load_file(file, 0, &jerr);
    if (!doc) {
        fprintf(stderr, "fleetml rules put: %s: %s (line %d)\n", file, jerr.text, jerr.line);
        return 1;
    }
    json_t *rule = NULL;
    fm_errbuf err;
    unsigned flags = strcmp(cfg->rules_loopback_webhooks, "on") == 0 ? FM_RULE_LOOPBACK_HTTP : 0;
    int rc = fm_rule_check(doc, flags, &rule, &err);
    json_decref(doc);
    if (rc) {
        fprintf(stderr, "fleetml rules put: %s\n", err.msg);
        return 1;
    }
    int64_t pos = 0;
    int type = fm_event_type_parse(json_string_value(json_object_get(rule, "event")));
    char *text = json_dumps(rule, JSON_COMPACT | JSON_PRESERVE_ORDER);
    rc = text ? fm_rules_source_position(st, type, &pos) : FM_ENOMEM;
    int created = 0;
    if (!rc) {
        fm_rule_row row = {.tenant = tenant,
                           .name = json_string_value(json_object_get(rule, "name")),
                           .spec_json = text,
                           .position = pos,
                           .updated_by = "cli"};
        rc = fm_store_rule_put(st, &row, &created, &err);
    }
    if (rc)
        fprintf(stderr, "fleetml rules put: %s\n", rc == FM_ENOMEM ? "out of memory" : err.msg);
    else
        printf("rule %s %s for tenant %s\n", json_string_value(json_object_get(rule, "name")),
               created ? "created" : "replaced", tenant);
    free(text);
    json_decref(rule);
    return rc ? 1 : 0;
}

static int print_log(void *ud, const fm_rule_log *l)
{
    if (ud)
        return json_array_append_new(ud, fm_rule_log_json(l));
    json_t *at = fm_json_time(l->at_ms);
    printf("%s %-40s %-20s %-14s attempt=%d %.3fms %s\n", json_string_value(at), l->event_id,
           l->target, l->outcome, l->attempt, (double)l->duration_us / 1000.0, l->error);
    json_decref(at);
    return 0;
}

static int find_rule(void *ud, const fm_rule_row *r)
{
    json_t **rule = ud;
    *rule = json_loads(r->spec_json, 0, NULL);
    return 1;
}

/* Moves the rule back so the engine delivers again everything from from_ms. */
static int rules_replay(fm_store *st, const char *tenant, const char *name, int64_t from_ms)
{
    json_t *rule = NULL;
    if (fm_store_rule_list(st, tenant, name, find_rule, &rule) != 0 || !rule) {
        fprintf(stderr, "fleetml rules replay: no rule '%s' for tenant %s\n", name, tenant);
        json_decref(rule);
        return 1;
    }
    int type = fm_event_type_parse(json_string_value(json_object_get(rule, "event")));
    json_decref(rule);
    int64_t pos = 0;
    fm_errbuf err;
    int rc = fm_store_rule_rewind(st, tenant, name, type >= 0 ? fm_event_source_name(fm_event_type_source(type)) : "",
                                  from_ms, &pos, &err);
    if (rc) {
        fprintf(stderr, "fleetml rules replay: %s\n", err.msg);
        return 1;
    }
    printf("rule %s replays from position %lld\n", name, (long long)pos);
    return 0;
}

int fm_cmd_rules(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    const char *tenant = fm_cli_take_opt(&argc, argv, "--tenant");
    const char *from = fm_cli_take_opt(&argc, argv, "--from");
    bool as_json = fm_cli_take_flag(&argc, argv, "--json");
    const char *sub = argc >= 2 ? argv[1] : "";
    bool list = strcmp(sub, "list") == 0 && argc == 2;
    bool put = strcmp(sub, "put") == 0 && argc == 3;
    bool del = strcmp(sub, "delete") == 0 && argc == 3;
    bool log = strcmp(sub, "log") == 0 && argc == 3;
    bool replay = strcmp(sub, "replay") == 0 && argc == 3 && from;
    int64_t from_ms = 0;
    if (replay && fm_rfc3339_parse(from, &from_ms) != 0) {
        fprintf(stderr, "fleetml rules replay: --from must be an RFC 3339 time\n");
        return 2;
    }
    if (!list && !put && !del && !log && !replay) {
        char name[32];
        snprintf(name, sizeof name, "rules %s", *sub ? sub : "");
        return fm_cli_usage_error(*sub ? name : "rules",
                                  strcmp(sub, "replay") == 0 && argc == 3
                                      ? "--from TIME is required"
                                      : "wrong number of arguments");
    }
    if (!list && !tenant) {
        char name[32];
        snprintf(name, sizeof name, "rules %s", sub);
        return fm_cli_usage_error(name, "--tenant is required");
    }
    fm_errbuf err;
    fm_store *st;
    if (fm_store_open(&cfg, &st, &err) != 0) {
        fprintf(stderr, "fleetml rules: %s\n", err.msg);
        return 1;
    }
    if (list)
        rc = rules_list(st, tenant, as_json);
    else if (put)
        rc = rules_put(st, &cfg, tenant, argv[2]);
    else if (del) {
        rc = fm_store_rule_delete(st, tenant, argv[2], &err);
        if (rc)
            fprintf(stderr, "fleetml rules delete: %s\n", err.msg);
        else
            printf("rule %s deleted\n", argv[2]);
        rc = rc ? 1 : 0;
    } else if (replay) {
        rc = rules_replay(st, tenant, argv[2], from_ms);
    } else {
        json_t *items = as_json ? json_array() : NULL;
        rc = fm_store_rule_log_page(st, tenant, argv[2], 0, 100, print_log, items) ? 1 : 0;
        if (items)
            rc = rc ? (json_decref(items), 1)
                    : fm_cli_print_json(json_pack("{s:o}", "items", items));
    }
    fm_store_close(st);
    return rc;
}

/* ---- functions ----------------------------------------------------------------- */

static void print_pool(void *ud, fm_fn_pool *p)
{
    if (ud) {
        json_array_append_new(ud, fm_fn_pool_json(p));
        return;
    }
    fm_fn_stats s;
    fm_fn_pool_stats(p, &s);
    printf("%-24s workers=%d started in %lld ms\n", fm_fn_pool_name(p), s.workers,
           (long long)s.last_start_ms);
}

/* `fleetml function call NAME`: starts the function's pool as `serve`
 * would, sends it the event read from stdin and prints the result. */
static int function_call(const fm_config *cfg, const char *name)
{
    char dir[PATH_MAX], path[PATH_MAX + 16], command[PATH_MAX], logs[PATH_MAX];
    if ((size_t)snprintf(dir, sizeof dir, "%s/%s", cfg->functions_dir, name) >= sizeof dir)
        return 2;
    snprintf(path, sizeof path, "%s/function.json", dir);
    json_error_t jerr;
    json_t *doc = json_load_file(path, 0, &jerr);
    if (!doc) {
        fprintf(stderr, "fleetml function call: %s: %s\n", path, jerr.text);
        return 1;
    }
    json_t *event = json_loadf(stdin, JSON_DECODE_ANY, &jerr);
    char *event_text = event ? json_dumps(event, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
    json_decref(event);
    if (!event_text) {
        fprintf(stderr, "fleetml function call: stdin is not JSON: %s\n", jerr.text);
        json_decref(doc);
        return 1;
    }
    char *env[FM_FN_ENV_MAX] = {0};
    fm_fn_spec spec;
    fm_errbuf err;
    fm_fn_pool *p = NULL;
    fm_config_path(cfg, "log/functions", logs, sizeof logs);
    int rc = fm_fn_spec_from_json(dir, name, doc, &spec, command, sizeof command, env,
                                  FM_FN_ENV_MAX, &err);
    spec.log_dir = logs;
    spec.min_workers = 1;
    if (!rc)
        rc = fm_fn_pool_start(&spec, &p, &err);
    char *result = NULL;
    int64_t us = 0;
    if (!rc)
        rc = fm_fn_call(p, event_text, &result, &us, &err);
    if (rc)
        fprintf(stderr, "fleetml function call: %s\n", err.msg);
    else
        printf("%s\n", result);
    fm_fn_stats s = {0};
    if (p)
        fm_fn_pool_stats(p, &s);
    if (!rc)
        fprintf(stderr, "call: %.3f ms; worker start: %lld ms\n", (double)us / 1000.0,
                (long long)s.last_start_ms);
    fm_free(result);
    fm_fn_pool_stop(p);
    for (size_t i = 0; i < FM_FN_ENV_MAX; i++)
        fm_free(env[i]);
    free(event_text);
    json_decref(doc);
    return rc ? 1 : 0;
}

int fm_cmd_function(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    bool as_json = fm_cli_take_flag(&argc, argv, "--json");
    if (argc == 2 && strcmp(argv[1], "list") == 0) {
        char logs[PATH_MAX];
        fm_config_path(&cfg, "log/functions", logs, sizeof logs);
        fm_fn_registry *reg = NULL;
        fm_errbuf err;
        if (fm_fn_registry_open(cfg.functions_dir, logs, &reg, &err) != 0) {
            fprintf(stderr, "fleetml function list: %s\n", err.msg);
            return 1;
        }
        json_t *items = as_json ? json_array() : NULL;
        fm_fn_registry_each(reg, print_pool, items);
        fm_fn_registry_close(reg);
        return items ? fm_cli_print_json(json_pack("{s:o}", "items", items)) : 0;
    }
    if (argc == 3 && strcmp(argv[1], "call") == 0)
        return function_call(&cfg, argv[2]);
    return fm_cli_usage_error(argc >= 2 && strcmp(argv[1], "call") == 0 ? "function call"
                                                                        : "function list",
                              "wrong number of arguments");
}

const fm_cli_cmd fm_cli_rules_cmds[] = {
    {.name = "rules",
     .summary = "rules on events: list, put, delete, log, replay",
     .text = "docs/functions.md describes events, rules and targets."},
    {.name = "rules list",
     .summary = "rules with their position and counters",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--tenant", "T", "only this tenant's rules"},
              {"--json", NULL, "one JSON document: {\"items\": [rule...]}"}},
     .examples = {"fleetml rules list --tenant st-mary"}},
    {.name = "rules put",
     .args = "FILE|-",
     .summary = "create or replace a rule from a JSON document",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--tenant", "T", "the rule's tenant (required)"}},
     .examples = {"fleetml rules put low-hct.json --tenant st-mary"}},
    {.name = "rules delete",
     .args = "NAME",
     .summary = "delete a rule and its log",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--tenant", "T", "the rule's tenant (required)"}},
     .examples = {"fleetml rules delete low-hct --tenant st-mary"}},
    {.name = "rules log",
     .args = "NAME",
     .summary = "the rule's latest deliveries, newest first",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--tenant", "T", "the rule's tenant (required)"},
              {"--json", NULL, "one JSON document: {\"items\": [delivery...]}"}},
     .examples = {"fleetml rules log low-hct --tenant st-mary --json"}},
    {.name = "rules replay",
     .args = "NAME",
     .summary = "deliver again every event since a time",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--tenant", "T", "the rule's tenant (required)"},
              {"--from", "TIME", "RFC 3339 time to replay from (required)"}},
     .examples = {"fleetml rules replay low-hct --tenant st-mary --from 2026-12-01T00:00:00Z"}},
    {.name = NULL},
};

const fm_cli_cmd fm_cli_function_cmds[] = {
    {.name = "function", .summary = "this node's functions: list, call"},
    {.name = "function list",
     .summary = "start every function of <data>/functions and list them",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--json", NULL, "one JSON document: {\"items\": [function...]}"}},
     .examples = {"fleetml function list --json"}},
    {.name = "function call",
     .args = "NAME",
     .summary = "one call with the event on stdin; the answer on stdout",
     .flags = FM_CLI_CONFIG,
     .examples = {"echo '{\"type\": \"result.produced\"}' | fleetml function call ward-note"}},
    {.name = NULL},
};
