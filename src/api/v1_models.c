/*
 * API v1: the model registry and deployment (fleetml/modelreg.h).
 *
 *   POST /models/{name}/versions                 upload (models.manage)
 *   GET  /models/{name}/versions                 list (models.read)
 *   GET  /models/{name}/versions/{version}       one, with manifest (models.read)
 *   POST /models/{name}/versions/{version}/approve | reject  (models.approve)
 *   GET  /models/{name}/aliases                  the tenant's aliases (models.read)
 *   PUT  /models/{name}/aliases/{alias}          deploy / roll back (models.deploy)
 *
 * Versions belong to the tenant that uploaded them ("" = the platform,
 * uploaded with the CLI): a user sees and deploys their own tenant's
 * versions and the platform's; an operator sees all.
 */
#include "api/api_int.h"
#include "fleetml/modelreg.h"

#include <openssl/evp.h>
#include <stdio.h>
#include <string.h>

#define MSG 192

static const char *status_name(int s)
{
    return s == FM_MODEL_APPROVED ? "approved" : s == FM_MODEL_REJECTED ? "rejected" : "pending";
}

static bool visible(const api_req *r, const fm_model_rec *v)
{
    return (r->who.role_mask & FM_ROLE_OPERATOR) || v->owner_tenant[0] == '\0' ||
           strcmp(v->owner_tenant, r->who.tenant) == 0;
}

static json_t *version_json(const fm_model_rec *v, bool with_manifest)
{
    char created[40], decided[40];
    json_t *o = json_pack(
        "{s:s,s:s,s:s,s:s?,s:s,s:s,s:I,s:s,s:s}", "name", v->name, "version", v->version, "status",
        status_name(v->status), "owner_tenant", v->owner_tenant[0] ? v->owner_tenant : NULL,
        "format", v->format, "sha256", v->sha256, "size", (json_int_t)v->size, "created_by",
        v->created_by, "created_at", fm_rfc3339(v->created_ms, created, sizeof created));
    if (o && v->status != FM_MODEL_PENDING)
        json_object_set_new(o, "decision",
                            json_pack("{s:s,s:s,s:s}", "by", v->decided_by, "at",
                                      fm_rfc3339(v->decided_ms, decided, sizeof decided), "note",
                                      v->note));
    if (o && with_manifest && v->manifest_json)
        json_object_set_new(o, "manifest", json_loads(v->manifest_json, 0, NULL));
    return o;
}

/* Strict standard base64 (RFC 4648 section 4, padded). Returns the decoded
 * bytes (fm_malloc'd) or NULL. */
static unsigned char *b64_decode(const char *s, size_t n, size_t *out_len)
{
    if (n == 0 || n % 4 != 0 || n > (size_t)INT32_MAX)
        return NULL;
    size_t pad = (s[n - 1] == '=') + (s[n - 2] == '=');
    for (size_t i = 0; i < n - pad; i++) {
        char c = s[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '+' || c == '/'))
            return NULL;
    }
    unsigned char *out = fm_malloc(n / 4 * 3 + 1);
    if (!out)
        return NULL;
    int len = EVP_DecodeBlock(out, (const unsigned char *)s, (int)n);
    if (len < 0 || (size_t)len < pad) {
        fm_free(out);
        return NULL;
    }
    *out_len = (size_t)len - pad;
    return out;
}

void v1_model_push(api_req *r)
{
    const char *name = r->params[0];
    json_t *man = json_object_get(r->json, "manifest");
    const char *b64 = json_string_value(json_object_get(r->json, "model"));
    if (!json_is_object(man) || !b64) {
        api_error(r, 400, "invalid_request",
                  "expected {\"manifest\": {...}, \"model\": \"<base64 of the XGBoost model "
                  "file>\"}");
        return;
    }
    size_t flen = 0;
    unsigned char *file = b64_decode(b64, json_string_length(json_object_get(r->json, "model")),
                                     &flen);
    if (!file) {
        api_error(r, 400, "invalid_request", "field 'model' is not standard padded base64");
        return;
    }
    char *mtext = json_dumps(man, JSON_COMPACT | JSON_PRESERVE_ORDER);
    fm_model_upload u = {.name = name, .manifest = mtext, .manifest_len = mtext ? strlen(mtext) : 0,
                         .file = file, .file_len = flen, .owner_tenant = r->who.tenant,
                         .actor = r->actor, .now_ms = r->now_ms};
    fm_model_rec v;
    fm_errbuf err;
    int rc = mtext ? fm_modelreg_push(r->store, &r->h->cfg, &u, &v, &err)
                   : fm_errf(&err, FM_ENOMEM, "out of memory");
    fm_free(file);
    fm_free(mtext);
    if (rc == 0) {
        api_audit(r, NULL, "model.upload", name, "ok",
                  json_pack("{s:s,s:s}", "version", v.version, "sha256", v.sha256));
        api_json(r, 201, version_json(&v, false));
    } else if (rc == FM_EINVAL || rc == FM_EMODEL) {
        api_audit(r, NULL, "model.upload", name, "failed", json_pack("{s:s}", "reason", err.msg));
        api_error(r, 422, "validation_failed", "%s", err.msg);
    } else if (rc == FM_EEXIST) {
        api_error(r, 409, "conflict", "%s", err.msg);
    } else {
        api_store_error(r, rc);
    }
}

typedef struct list_ctx {
    api_req *r;
    json_t *items;
} list_ctx;

static int on_version(void *ud, const fm_model_rec *v)
{
    list_ctx *c = ud;
    if (visible(c->r, v))
        json_array_append_new(c->items, version_json(v, false));
    return 0;
}

void v1_model_versions(api_req *r)
{
    list_ctx c = {.r = r, .items = json_array()};
    int rc = c.items ? r->store->models->version_list(r->store, r->params[0], on_version, &c)
                     : FM_ENOMEM;
    api_page_answer(r, rc, c.items, NULL);
}

/* The version of the path, when it exists and the caller may see it;
 * otherwise answered (404) and false. */
static bool find_version(api_req *r, fm_model_rec *v)
{
    int rc = r->store->models->version_get(r->store, r->params[0], r->params[1], v);
    if (rc == 0 && !visible(r, v))
        rc = FM_ENOTFOUND;
    if (rc == FM_ENOTFOUND)
        api_error(r, 404, "not_found", "no such model version");
    else if (rc)
        api_store_error(r, rc);
    if (rc)
        fm_model_rec_clear(v);
    return rc == 0;
}

void v1_model_version_get(api_req *r)
{
    fm_model_rec v;
    if (!find_version(r, &v))
        return;
    api_json(r, 200, version_json(&v, true));
    fm_model_rec_clear(&v);
}

static void decide(api_req *r, int status)
{
    fm_model_rec v;
    if (!find_version(r, &v))
        return;
    fm_model_rec_clear(&v);
    const char *note = NULL;
    char msg[MSG];
    if (r->json && fm_api_get_str(r->json, "note", false, 255, &note, msg, sizeof msg)) {
        api_error(r, 400, "invalid_request", "%s", msg);
        return;
    }
    fm_errbuf err;
    int rc = r->store->models->version_decide(r->store, r->params[0], r->params[1], status,
                                              r->actor, note ? note : "", r->now_ms, &err);
    const char *action = status == FM_MODEL_APPROVED ? "model.approve" : "model.reject";
    if (rc == FM_ESTATE) {
        api_error(r, 409, "conflict", "%s", err.msg);
        return;
    }
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    api_audit(r, NULL, action, r->params[0], "ok",
              json_pack("{s:s,s:s}", "version", r->params[1], "note", note ? note : ""));
    if (find_version(r, &v)) {
        api_json(r, 200, version_json(&v, false));
        fm_model_rec_clear(&v);
    }
}

void v1_model_approve(api_req *r) { decide(r, FM_MODEL_APPROVED); }
void v1_model_reject(api_req *r) { decide(r, FM_MODEL_REJECTED); }

typedef struct alias_ctx {
    const char *name;
    json_t *items;
} alias_ctx;

static int on_alias(void *ud, const fm_model_alias *a)
{
    alias_ctx *c = ud;
    if (strcmp(a->name, c->name) != 0)
        return 0;
    char at[40];
    json_t *o = json_pack("{s:s,s:s,s:s,s:s,s:s}", "tenant", a->tenant, "alias", a->alias,
                          "version", a->version, "updated_by", a->updated_by, "updated_at",
                          fm_rfc3339(a->updated_ms, at, sizeof at));
    if (o && strcmp(a->alias, FM_ALIAS_CANARY) == 0)
        json_object_set_new(o, "share_pct", json_integer(a->share_pct));
    json_array_append_new(c->items, o);
    return 0;
}

void v1_model_aliases(api_req *r)
{
    const char *tenant;
    if (!api_scope_tenant(r, &tenant))
        return;
    alias_ctx c = {.name = r->params[0], .items = json_array()};
    int rc = c.items ? r->store->models->alias_list(r->store, tenant, on_alias, &c) : FM_ENOMEM;
    api_page_answer(r, rc, c.items, NULL);
}

void v1_model_alias_put(api_req *r)
{
    const char *tenant;
    if (!api_scope_tenant(r, &tenant))
        return;
    const char *alias = r->params[1];
    if (!fm_modelreg_alias_valid(alias)) {
        api_error(r, 404, "not_found", "aliases are '%s', '%s' and '%s'", FM_ALIAS_PRODUCTION,
                  FM_ALIAS_CANARY, FM_ALIAS_SHADOW);
        return;
    }
    const char *version = NULL;
    long long share = 100;
    char msg[MSG];
    bool canary = strcmp(alias, FM_ALIAS_CANARY) == 0;
    json_t *vj = json_object_get(r->json, "version");
    if (json_is_null(vj)) {
        version = "";
    } else if (fm_api_get_str(r->json, "version", true, 32, &version, msg, sizeof msg)) {
        api_error(r, 400, "invalid_request", "%s (null removes the alias)", msg);
        return;
    }
    if (fm_api_get_int(r->json, "share_pct", canary && *version, 1, 100, &share, msg,
                       sizeof msg)) {
        api_error(r, 400, "invalid_request", "%s", msg);
        return;
    }
    if (!canary && json_object_get(r->json, "share_pct")) {
        api_error(r, 400, "invalid_request", "share_pct is for the canary alias only");
        return;
    }
    fm_model_rec v;
    if (*version) {
        int rc = r->store->models->version_get(r->store, r->params[0], version, &v);
        if (rc == 0 && !visible(r, &v))
            rc = FM_ENOTFOUND;
        bool approved = rc == 0 && v.status == FM_MODEL_APPROVED;
        fm_model_rec_clear(&v);
        if (rc == FM_ENOTFOUND) {
            api_error(r, 404, "not_found", "no such model version");
            return;
        }
        if (rc) {
            api_store_error(r, rc);
            return;
        }
        if (!approved) {
            api_error(r, 409, "conflict", "only an approved version can be deployed");
            return;
        }
    }
    fm_model_alias a = {.share_pct = canary ? (int)share : 100, .updated_ms = r->now_ms};
    snprintf(a.tenant, sizeof a.tenant, "%s", tenant);
    snprintf(a.name, sizeof a.name, "%s", r->params[0]);
    snprintf(a.alias, sizeof a.alias, "%s", alias);
    snprintf(a.version, sizeof a.version, "%s", version);
    snprintf(a.updated_by, sizeof a.updated_by, "%s", r->actor);
    fm_errbuf err;
    int rc = r->store->models->alias_set(r->store, &a, &err);
    if (rc == FM_ESTATE || rc == FM_ENOTFOUND) {
        api_error(r, 409, "conflict", "%s", err.msg);
        return;
    }
    if (rc) {
        api_store_error(r, rc);
        return;
    }
    api_audit(r, tenant, "model.deploy", r->params[0], "ok",
              json_pack("{s:s,s:s,s:i}", "alias", alias, "version", version, "share_pct",
                        a.share_pct));
    char at[40];
    json_t *o = json_pack("{s:s,s:s,s:s?,s:s,s:s}", "tenant", tenant, "alias", alias, "version",
                          *version ? version : NULL, "updated_by", a.updated_by, "updated_at",
                          fm_rfc3339(a.updated_ms, at, sizeof at));
    if (o && canary)
        json_object_set_new(o, "share_pct", json_integer(a.share_pct));
    api_json(r, 200, o);
}
