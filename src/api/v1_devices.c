/*
 * API v1: devices (with presence), their shadows, and provisioning
 * templates. Every change goes through the store, which appends a registry
 * event in the same transaction; each node's registry thread turns it into
 * broker control messages within ~200 ms (see fleetml/registry.h).
 */
#include "api/api_int.h"
#include "fleetml/registry.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MSG 192

typedef struct dev_page {
    fm_store *st;
    json_t *items;
} dev_page;

static int on_device(void *ud, const fm_device *d)
{
    dev_page *p = ud;
    json_array_append_new(p->items, fm_device_json(p->st, d));
    return 0;
}

/* GET /fleet/events: the tenant's devices going online and offline, live
 * (stream.c). */
void v1_fleet_events(api_req *r)
{
    const char *tenant;
    if (api_scope_tenant(r, &tenant))
        api_fleet_stream_open(r, tenant);
}

void v1_devices_list(api_req *r)
{
    const char *tenant;
    size_t limit;
    int64_t a, b;
    char after[72];
    if (!api_scope_tenant(r, &tenant) || !api_page_args(r, &limit, &a, &b, after, sizeof after))
        return;
    dev_page p = {.st = r->store, .items = json_array()};
    /* One row more than asked tells whether there is a next page. */
    int rc = fm_store_device_page(r->store, tenant, after, limit + 1, on_device, &p);
    char next[128] = "";
    if (!rc) {
        api_page_more_by_name(p.items, limit, "id", next, sizeof next);
        api_audit(r, tenant, "device.list", "", "ok", NULL);
    }
    api_page_answer(r, rc, p.items, next);
}

void v1_device_get(api_req *r)
{
    fm_device d;
    if (api_device_visible(r, r->params[0], &d))
        api_json(r, 200, fm_device_json(r->store, &d));
}

static void change_status(api_req *r, int status)
{
    fm_device d;
    if (!api_device_visible(r, r->params[0], &d))
        return;
    const char *action = status == FM_DEVICE_ACTIVE     ? "device.enable"
                         : status == FM_DEVICE_DISABLED ? "device.disable"
                                                        : "device.revoke";
    if (d.status == FM_DEVICE_REVOKED && status != FM_DEVICE_REVOKED) {
        api_error(r, 409, "conflict", "device '%s' is revoked; revocation is irreversible", d.id);
        return;
    }
    fm_errbuf err;
    int rc = status == FM_DEVICE_REVOKED ? fm_store_device_revoke(r->store, d.id, &err)
                                         : fm_store_device_set_status(r->store, d.id, status, &err);
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    char target[80];
    snprintf(target, sizeof target, "device:%s", d.id);
    api_audit(r, d.tenant, action, target, "ok", NULL);
    if (fm_store_device_get(r->store, d.id, &d) != 0) {
        api_store_error(r, FM_EDB);
        return;
    }
    api_json(r, 200, fm_device_json(r->store, &d));
}

void v1_device_disable(api_req *r) { change_status(r, FM_DEVICE_DISABLED); }
void v1_device_enable(api_req *r) { change_status(r, FM_DEVICE_ACTIVE); }
void v1_device_revoke(api_req *r) { change_status(r, FM_DEVICE_REVOKED); }

static json_t *shadow_json(const fm_shadow *sh)
{
    json_t *des = json_loads(sh->desired ? sh->desired : "{}", 0, NULL);
    json_t *rep = json_loads(sh->reported ? sh->reported : "{}", 0, NULL);
    if (!des)
        des = json_object();
    if (!rep)
        rep = json_object();
    json_t *delta = fm_shadow_delta(des, rep);
    return json_pack("{s:o,s:o,s:I,s:o,s:o}", "desired", des, "reported", rep, "version",
                     (json_int_t)sh->version, "updated_at", fm_json_time(sh->updated_ms), "delta",
                     delta ? delta : json_object());
}

void v1_shadow_get(api_req *r)
{
    fm_device d;
    if (!api_device_visible(r, r->params[0], &d))
        return;
    fm_shadow sh = {0};
    int rc = fm_store_shadow_get(r->store, d.id, &sh);
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    api_json(r, 200, shadow_json(&sh));
    fm_shadow_clear(&sh);
}

void v1_shadow_patch(api_req *r)
{
    fm_device d;
    if (!api_device_visible(r, r->params[0], &d))
        return;
    json_t *patch = json_object_get(r->json, "desired");
    if (!json_is_object(patch) || json_object_size(r->json) != 1) {
        api_error(r, 400, "invalid_request",
                  "body must be {\"desired\": {...}} (a JSON merge patch of the desired state)");
        return;
    }
    if (d.status == FM_DEVICE_REVOKED) {
        api_error(r, 409, "conflict", "device '%s' is revoked", d.id);
        return;
    }
    fm_shadow sh = {0};
    fm_errbuf err;
    int rc = fm_shadow_set_desired(r->store, d.id, patch, &sh, &err);
    if (rc == FM_ERANGE) {
        api_error(r, 422, "validation_failed", "%s", err.msg);
        return;
    }
    if (rc == FM_EBUSY) {
        r->retry_after = 1;
        api_error(r, 409, "conflict", "%s", err.msg);
        return;
    }
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    char target[80];
    snprintf(target, sizeof target, "device:%s", d.id);
    api_audit(r, d.tenant, "device.shadow", target, "ok",
              json_pack("{s:O}", "desired_patch", patch));
    api_json(r, 200, shadow_json(&sh));
    fm_shadow_clear(&sh);
}

/* ---- templates ---- */

typedef struct tmpl_list {
    const char *tenant;
    json_t *items;
} tmpl_list;

static int on_template(void *ud, const fm_template *t)
{
    tmpl_list *l = ud;
    if (strcmp(t->tenant, l->tenant) == 0)
        json_array_append_new(l->items, fm_template_json(t));
    return 0;
}

void v1_templates_list(api_req *r)
{
    const char *tenant;
    if (!api_scope_tenant(r, &tenant))
        return;
    tmpl_list l = {.tenant = tenant, .items = json_array()};
    api_page_answer(r, fm_store_template_list(r->store, on_template, &l), l.items, NULL);
}

/* Templates are global names: one belonging to another tenant reads as
 * missing. */
static bool visible_template(api_req *r, const char *name, fm_template *t)
{
    int rc = fm_store_template_get(r->store, name, t);
    if (rc == 0 && !fm_auth_tenant_allowed(&r->who, t->tenant))
        rc = FM_ENOTFOUND;
    if (rc == FM_ENOTFOUND) {
        api_error(r, 404, "not_found", "no such template");
        return false;
    }
    if (rc) {
        api_store_error(r, rc);
        return false;
    }
    return true;
}

#define MAX_SERIALS 10000

void v1_templates_create(api_req *r)
{
    const char *tenant;
    if (!api_scope_tenant(r, &tenant))
        return;
    fm_template t = {.cert_days = 825, .rate_per_min = 60, .status = FM_TEMPLATE_ACTIVE};
    const char *name = NULL, *group = NULL, *prefix = NULL, *hook = NULL;
    long long days = t.cert_days, rate = t.rate_per_min;
    bool reprov = false;
    char msg[MSG];
    if (fm_api_get_str(r->json, "name", true, 63, &name, msg, sizeof msg) ||
        fm_api_get_str(r->json, "group", false, 64, &group, msg, sizeof msg) ||
        fm_api_get_str(r->json, "device_prefix", false, 32, &prefix, msg, sizeof msg) ||
        fm_api_get_str(r->json, "hook", false, 511, &hook, msg, sizeof msg) ||
        fm_api_get_int(r->json, "cert_days", false, 1, 3650, &days, msg, sizeof msg) ||
        fm_api_get_int(r->json, "rate_per_min", false, 0, 100000, &rate, msg, sizeof msg) ||
        fm_api_get_bool(r->json, "allow_reprovision", false, &reprov, msg, sizeof msg)) {
        api_error(r, 400, "invalid_request", "%s", msg);
        return;
    }
    snprintf(t.name, sizeof t.name, "%s", name);
    snprintf(t.tenant, sizeof t.tenant, "%s", tenant);
    snprintf(t.device_group, sizeof t.device_group, "%s", group ? group : "");
    snprintf(t.device_prefix, sizeof t.device_prefix, "%s", prefix ? prefix : name);
    snprintf(t.hook, sizeof t.hook, "%s", hook ? hook : "");
    t.cert_days = (int)days;
    t.rate_per_min = (int)rate;
    t.allow_reprovision = reprov;
    fm_errbuf err;
    if (fm_template_check(&t, &err) != 0) {
        api_error(r, 400, "invalid_request", "%s", err.msg);
        return;
    }
    json_t *sv = json_object_get(r->json, "serials");
    const char **serials = NULL;
    size_t n = 0;
    if (sv) {
        if (!json_is_array(sv) || json_array_size(sv) == 0 || json_array_size(sv) > MAX_SERIALS) {
            api_error(r, 400, "invalid_request",
                      "field 'serials' must be an array of 1 to %d serial numbers", MAX_SERIALS);
            return;
        }
        serials = fm_calloc(json_array_size(sv), sizeof *serials);
        if (!serials) {
            api_error(r, 500, "internal", "out of memory");
            return;
        }
        size_t i;
        json_t *e;
        json_array_foreach(sv, i, e) {
            const char *s = json_string_value(e);
            size_t l = s ? json_string_length(e) : 0;
            if (!s || l == 0 || l > 64 || strlen(s) != l) {
                fm_free(serials);
                api_error(r, 400, "invalid_request", "serials[%zu] must be a serial number", i);
                return;
            }
            serials[n++] = s;
        }
    }
    int rc = fm_store_template_add(r->store, &t, serials, n, &err);
    fm_free(serials);
    if (rc == FM_EEXIST) {
        api_error(r, 409, "conflict", "template '%s' already exists", t.name);
        return;
    }
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    char target[80];
    snprintf(target, sizeof target, "template:%s", t.name);
    api_audit(r, tenant, "template.create", target, "ok", NULL);
    fm_template stored;
    if (fm_store_template_get(r->store, t.name, &stored) != 0) {
        api_store_error(r, FM_EDB);
        return;
    }
    api_json(r, 201, fm_template_json(&stored));
}

static void rm_tree(const char *dir)
{
    char p[PATH_MAX + 16];
    snprintf(p, sizeof p, "%s/claim.key", dir);
    unlink(p);
    snprintf(p, sizeof p, "%s/claim.crt", dir);
    unlink(p);
    rmdir(dir);
}

void v1_template_claim_cert(api_req *r)
{
    fm_template t;
    if (!visible_template(r, r->params[0], &t))
        return;
    /* The key is made here and handed over once: a claim certificate is a
     * shared secret by design (every device of a batch carries it). Files
     * live only for this request, in a private directory. */
    char base[PATH_MAX], dir[PATH_MAX], serial[64], ca[PATH_MAX];
    fm_config_path(&r->h->cfg, "tmp", base, sizeof base);
    if (fm_mkdirs(base, 0700) != 0 ||
        snprintf(dir, sizeof dir, "%s/claim-XXXXXX", base) >= (int)sizeof dir || !mkdtemp(dir)) {
        api_error(r, 500, "internal", "cannot create a temporary directory");
        return;
    }
    fm_errbuf err;
    int rc = fm_template_claim_cert(&r->h->cfg, r->store, t.name, dir, serial, sizeof serial, &err);
    char *key = NULL, *crt = NULL, *cacrt = NULL;
    char p[PATH_MAX + 16];
    if (!rc) {
        snprintf(p, sizeof p, "%s/claim.key", dir);
        rc = fm_read_file(p, &key, NULL);
        snprintf(p, sizeof p, "%s/claim.crt", dir);
        if (!rc)
            rc = fm_read_file(p, &crt, NULL);
        if (!rc)
            rc = fm_read_file(fm_config_path(&r->h->cfg, "pki/ca.crt", ca, sizeof ca), &cacrt,
                              NULL);
    }
    rm_tree(dir);
    if (rc) {
        fm_free(key);
        fm_free(crt);
        fm_free(cacrt);
        api_store_error(r, rc);
        return;
    }
    char target[80];
    snprintf(target, sizeof target, "template:%s", t.name);
    api_audit(r, t.tenant, "template.claim_cert", target, "ok", json_pack("{s:s}", "serial", serial));
    api_json(r, 201,
             json_pack("{s:s,s:s,s:s,s:s,s:s}", "template", t.name, "serial", serial,
                       "certificate_pem", crt, "private_key_pem", key, "ca_pem", cacrt));
    size_t kl = strlen(key);
    memset(key, 0, kl);
    fm_free(key);
    fm_free(crt);
    fm_free(cacrt);
}
