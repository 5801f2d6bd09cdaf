/*
 * API v1: rules (what to do when an event happens) and the functions of
 * this node (fleetml/rules.h, fleetml/functions.h). A rule's document is
 * checked (jq compiled, targets validated) before it is stored; secrets
 * are never shown back.
 */
#include "api/api_int.h"
#include "fleetml/events.h"
#include "fleetml/functions.h"
#include "fleetml/json.h"
#include "fleetml/rules.h"

#include <stdio.h>
#include <string.h>

typedef struct rule_list {
    json_t *items;
    bool full;
} rule_list;

static int on_rule(void *ud, const fm_rule_row *row)
{
    rule_list *l = ud;
    json_array_append_new(l->items, fm_rule_row_json(row));
    return 0;
}

void v1_rules_list(api_req *r)
{
    const char *tenant;
    if (!api_scope_tenant(r, &tenant))
        return;
    rule_list l = {.items = json_array()};
    int rc = fm_store_rule_list(r->store, tenant, NULL, on_rule, &l);
    if (rc) {
        json_decref(l.items);
        api_store_error(r, rc);
        return;
    }
    api_json(r, 200, json_pack("{s:o}", "items", l.items));
}

/* The tenant a rule call acts on; false: answered. */
static bool rule_tenant(api_req *r, const char **tenant)
{
    if (!api_scope_tenant(r, tenant))
        return false;
    if (!*tenant) { /* an operator without ?tenant= */
        api_error(r, 400, "invalid_request", "name the tenant with ?tenant=");
        return false;
    }
    return true;
}

void v1_rule_get(api_req *r)
{
    const char *tenant;
    if (!rule_tenant(r, &tenant))
        return;
    rule_list l = {.items = json_array()};
    int rc = fm_store_rule_list(r->store, tenant, r->params[0], on_rule, &l);
    if (!rc && json_array_size(l.items) == 0) {
        json_decref(l.items);
        api_error(r, 404, "not_found", "no rule '%s'", r->params[0]);
        return;
    }
    if (rc) {
        json_decref(l.items);
        api_store_error(r, rc);
        return;
    }
    api_json(r, 200, json_incref(json_array_get(l.items, 0)));
    json_decref(l.items);
}

void v1_rule_put(api_req *r)
{
    const char *tenant;
    if (!rule_tenant(r, &tenant))
        return;
    json_t *in = r->json;
    json_t *name = json_object_get(in, "name");
    if (name && (!json_is_string(name) || strcmp(json_string_value(name), r->params[0]) != 0)) {
        api_error(r, 400, "invalid_request", "name in the body differs from the path");
        return;
    }
    json_t *doc = json_deep_copy(in);
    if (doc)
        json_object_set_new(doc, "name", json_string(r->params[0]));
    json_t *rule = NULL;
    fm_errbuf err;
    unsigned flags = strcmp(r->h->cfg.rules_loopback_webhooks, "on") == 0 ? FM_RULE_LOOPBACK_HTTP : 0;
    int rc = doc ? fm_rule_check(doc, flags, &rule, &err) : FM_ENOMEM;
    json_decref(doc);
    if (rc == FM_EINVAL) {
        api_error(r, 422, "validation_failed", "%s", err.msg);
        return;
    }
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    /* A new rule starts at the present of its source: it reacts to what
     * happens from now on (see POST .../replay for the past). */
    int64_t pos = 0;
    int type = fm_event_type_parse(json_string_value(json_object_get(rule, "event")));
    char *text = json_dumps(rule, JSON_COMPACT | JSON_PRESERVE_ORDER);
    rc = text ? fm_rules_source_position(r->store, type, &pos) : FM_ENOMEM;
    int created = 0;
    if (!rc) {
        fm_rule_row row = {.tenant = tenant, .name = r->params[0], .spec_json = text,
                           .position = pos, .updated_by = r->who.username};
        rc = fm_store_rule_put(r->store, &row, &created, &err);
    }
    free(text);
    if (rc) {
        json_decref(rule);
        api_store_error(r, rc);
        return;
    }
    char target[96];
    snprintf(target, sizeof target, "rule:%s", r->params[0]);
    json_t *shown = fm_rule_redacted(rule);
    api_audit(r, tenant, created ? "rule.create" : "rule.update", target, "ok",
              json_pack("{s:O}", "rule", shown));
    json_decref(rule);
    json_object_set_new(shown, "tenant", json_string(tenant));
    api_json(r, created ? 201 : 200, shown);
}

void v1_rule_delete(api_req *r)
{
    const char *tenant;
    if (!rule_tenant(r, &tenant))
        return;
    fm_errbuf err;
    int rc = fm_store_rule_delete(r->store, tenant, r->params[0], &err);
    if (rc == FM_ENOTFOUND) {
        api_error(r, 404, "not_found", "no rule '%s'", r->params[0]);
        return;
    }
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    char target[96];
    snprintf(target, sizeof target, "rule:%s", r->params[0]);
    api_audit(r, tenant, "rule.delete", target, "ok", NULL);
    api_no_content(r);
}

/* POST /rules/{name}/replay {"from": time}: delivers again every event of
 * the rule's type and tenant committed from then on (from the store: the
 * data the lake is exported from). */
void v1_rule_replay(api_req *r)
{
    const char *tenant;
    if (!rule_tenant(r, &tenant))
        return;
    json_t *from = json_object_get(r->json, "from");
    int64_t from_ms = 0;
    if (!json_is_string(from) || fm_rfc3339_parse(json_string_value(from), &from_ms) != 0 ||
        json_object_size(r->json) != 1) {
        api_error(r, 400, "invalid_request", "body must be {\"from\": RFC 3339 time}");
        return;
    }
    rule_list l = {.items = json_array()};
    int rc = fm_store_rule_list(r->store, tenant, r->params[0], on_rule, &l);
    json_t *rule = json_array_get(l.items, 0);
    if (!rc && !rule) {
        json_decref(l.items);
        api_error(r, 404, "not_found", "no rule '%s'", r->params[0]);
        return;
    }
    int type = fm_event_type_parse(json_string_value(json_object_get(rule, "event")));
    const char *source = type >= 0 ? fm_event_source_name(fm_event_type_source(type)) : "";
    json_decref(l.items);
    int64_t pos = 0;
    fm_errbuf err;
    if (!rc)
        rc = fm_store_rule_rewind(r->store, tenant, r->params[0], source, from_ms, &pos, &err);
    if (rc == FM_EINVAL) {
        api_error(r, 422, "validation_failed", "%s", err.msg);
        return;
    }
    if (rc == FM_ENOTFOUND) {
        api_error(r, 404, "not_found", "no rule '%s'", r->params[0]);
        return;
    }
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    char target[96];
    snprintf(target, sizeof target, "rule:%s", r->params[0]);
    api_audit(r, tenant, "rule.replay", target, "ok", json_pack("{s:O}", "from", from));
    api_json(r, 202, json_pack("{s:s,s:O,s:I}", "rule", r->params[0], "from", from, "position",
                               (json_int_t)pos));
}

typedef struct log_page {
    json_t *items;
    int64_t last;
} log_page;

static int on_log(void *ud, const fm_rule_log *l)
{
    log_page *p = ud;
    p->last = l->seq;
    json_array_append_new(p->items, fm_rule_log_json(l));
    return 0;
}

/* GET /rules/{name}/invocations: every delivery attempt, newest first. */
void v1_rule_invocations(api_req *r)
{
    const char *tenant;
    size_t limit;
    int64_t before, unused;
    char cs[8];
    if (!rule_tenant(r, &tenant) || !api_page_args(r, &limit, &before, &unused, cs, sizeof cs))
        return;
    log_page p = {.items = json_array()};
    int rc = fm_store_rule_log_page(r->store, tenant, r->params[0], before, limit + 1, on_log, &p);
    char next[64] = "";
    if (!rc && json_array_size(p.items) > limit) {
        json_array_remove(p.items, limit);
        int64_t seq = json_integer_value(json_object_get(json_array_get(p.items, limit - 1), "seq"));
        fm_api_cursor_encode(seq, 0, "", next, sizeof next);
    }
    api_page_answer(r, rc, p.items, next);
}

static void on_pool(void *ud, fm_fn_pool *p) { json_array_append_new(ud, fm_fn_pool_json(p)); }

/* GET /functions: this node's functions with their pools' counters. */
void v1_functions_list(api_req *r)
{
    json_t *items = json_array();
    fm_fn_registry_each(r->h->functions, on_pool, items);
    api_json(r, 200, json_pack("{s:o}", "items", items));
}
