/*
 * The model registry's logic (fleetml/modelreg.h): what an upload must be,
 * and where a version is kept (the catalogue, and the lake under
 * models/<name>/<version>/).
 */
#include "fleetml/modelreg.h"
#include "fleetml/lake.h"

#include <fcntl.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static bool name_char(char c, bool first)
{
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (!first && (c == '-' || c == '_'));
}

bool fm_modelreg_name_valid(const char *s)
{
    size_t n = s ? strnlen(s, 65) : 0;
    if (n == 0 || n > 64)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!name_char(s[i], i == 0))
            return false;
    return true;
}

bool fm_modelreg_version_valid(const char *s)
{
    size_t n = s ? strnlen(s, 33) : 0;
    if (n == 0 || n > 32)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        bool alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
        if (!alnum && (i == 0 || (c != '.' && c != '_' && c != '-')))
            return false;
    }
    return true;
}

bool fm_modelreg_alias_valid(const char *s)
{
    return s && (strcmp(s, FM_ALIAS_PRODUCTION) == 0 || strcmp(s, FM_ALIAS_CANARY) == 0 ||
                 strcmp(s, FM_ALIAS_SHADOW) == 0);
}

static int sha256_hex(const void *data, size_t len, char out[65])
{
    unsigned char md[32];
    unsigned int n = 0;
    if (EVP_Digest(data, len, md, &n, EVP_sha256(), NULL) != 1 || n != sizeof md)
        return FM_ECRYPTO;
    for (unsigned i = 0; i < sizeof md; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
    return 0;
}

/* Writes data into a spool file of the lake and publishes it under key. */
static int lake_put_bytes(fm_lake *l, const char *key, const void *data, size_t len,
                          fm_errbuf *err)
{
    char spool[PATH_MAX];
    if ((size_t)snprintf(spool, sizeof spool, "%s/model-%ld-XXXXXX", l->spool_dir,
                         (long)getpid()) >= sizeof spool)
        return fm_errf(err, FM_EINVAL, "lake: spool path too long");
    int fd = mkstemp(spool);
    if (fd < 0)
        return fm_errf(err, FM_EIO, "lake: cannot create a spool file in %s", l->spool_dir);
    int rc = fm_write_full(fd, data, len);
    if (!rc)
        rc = fm_fsync_fd(fd);
    close(fd);
    if (rc) {
        unlink(spool);
        return fm_errf(err, rc, "lake: cannot write %s", spool);
    }
    rc = fm_lake_put(l, key, spool, err);
    if (rc)
        unlink(spool);
    return rc;
}

int fm_modelreg_push(fm_store *st, const fm_config *cfg, const fm_model_upload *u,
                     fm_model_rec *out, fm_errbuf *err)
{
    memset(out, 0, sizeof *out);
    if (!fm_modelreg_name_valid(u->name))
        return fm_errf(err, FM_EINVAL, "name: expected [a-z0-9][a-z0-9_-]{0,63}");
    if (!u->file || u->file_len == 0 || u->file_len > FM_MODEL_FILE_MAX)
        return fm_errf(err, FM_EINVAL, "model file: expected 1 to %u bytes",
                       FM_MODEL_FILE_MAX);
    /* The manifest names the version; the booster must agree with it. */
    json_error_t je;
    json_t *man = json_loadb(u->manifest ? u->manifest : "", u->manifest_len,
                             JSON_REJECT_DUPLICATES, &je);
    const char *mname = json_string_value(json_object_get(man, "name"));
    const char *mver = json_string_value(json_object_get(man, "version"));
    int rc = 0;
    if (!json_is_object(man))
        rc = fm_errf(err, FM_EINVAL, "manifest: expected a JSON object (%s)", je.text);
    else if (!mname || strcmp(mname, u->name) != 0)
        rc = fm_errf(err, FM_EINVAL, "manifest: name must be '%s'", u->name);
    else if (!fm_modelreg_version_valid(mver))
        rc = fm_errf(err, FM_EINVAL, "manifest: version: expected [A-Za-z0-9][A-Za-z0-9._-]{0,31}");
    if (!rc) {
        snprintf(out->name, sizeof out->name, "%s", u->name);
        snprintf(out->version, sizeof out->version, "%s", mver);
    }
    json_decref(man);
    if (rc)
        return rc;
    fm_model *m = NULL;
    if ((rc = fm_model_load_mem(u->manifest, u->manifest_len, u->file, u->file_len, &m, err)))
        return rc;
    fm_model_free(m);

    fm_model_rec have;
    rc = st->models->version_get(st, out->name, out->version, &have);
    fm_model_rec_clear(&have);
    if (rc == 0)
        return fm_errf(err, FM_EEXIST, "model %s version %s already exists", out->name,
                       out->version);
    if (rc != FM_ENOTFOUND)
        return fm_errf(err, rc, "model registry unavailable");

    /* The first byte tells the formats apart: JSON text starts with '{'
     * followed by whitespace or '"'; UBJSON's '{' is followed by a type
     * marker. */
    const unsigned char *b = u->file;
    bool json = u->file_len > 1 && b[0] == '{' &&
                (b[1] == '"' || b[1] == ' ' || b[1] == '\n' || b[1] == '\r' || b[1] == '\t' ||
                 b[1] == '}');
    snprintf(out->format, sizeof out->format, "%s", json ? "json" : "ubj");
    snprintf(out->owner_tenant, sizeof out->owner_tenant, "%s",
             u->owner_tenant ? u->owner_tenant : "");
    snprintf(out->created_by, sizeof out->created_by, "%s", u->actor ? u->actor : "");
    out->created_ms = u->now_ms;
    out->size = (int64_t)u->file_len;
    out->status = FM_MODEL_PENDING;
    if (sha256_hex(u->file, u->file_len, out->sha256) != 0)
        return fm_errf(err, FM_ECRYPTO, "cannot hash the model file");

    /* Lake first (objects are idempotent), the catalogue row last: the row
     * is what makes the version exist. */
    fm_lake *lake = NULL;
    if ((rc = fm_lake_open(cfg, &lake, err)))
        return rc;
    char key[256];
    snprintf(key, sizeof key, "models/%s/%s/manifest.json", out->name, out->version);
    rc = lake_put_bytes(lake, key, u->manifest, u->manifest_len, err);
    if (!rc) {
        snprintf(key, sizeof key, "models/%s/%s/model.%s", out->name, out->version, out->format);
        rc = lake_put_bytes(lake, key, u->file, u->file_len, err);
    }
    fm_lake_close(lake);
    if (rc)
        return rc;
    fm_model_rec row = *out;
    row.manifest_json = fm_strndup(u->manifest, u->manifest_len);
    if (!row.manifest_json)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    rc = st->models->version_add(st, &row, u->file, u->file_len, err);
    fm_free(row.manifest_json);
    return rc;
}

const char *fm_model_status_name(int s)
{
    return s == FM_MODEL_APPROVED ? "approved" : s == FM_MODEL_REJECTED ? "rejected" : "pending";
}

json_t *fm_model_version_json(const fm_model_rec *v, bool with_manifest)
{
    char created[40], decided[40];
    json_t *o = json_pack(
        "{s:s,s:s,s:s,s:s?,s:s,s:s,s:I,s:s,s:s}", "name", v->name, "version", v->version, "status",
        fm_model_status_name(v->status), "owner_tenant", v->owner_tenant[0] ? v->owner_tenant : NULL,
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

json_t *fm_model_alias_json(const fm_model_alias *a)
{
    char at[40];
    json_t *o = json_pack("{s:s,s:s,s:s,s:s,s:s}", "tenant", a->tenant, "alias", a->alias,
                          "version", a->version, "updated_by", a->updated_by, "updated_at",
                          fm_rfc3339(a->updated_ms, at, sizeof at));
    if (o && strcmp(a->alias, FM_ALIAS_CANARY) == 0)
        json_object_set_new(o, "share_pct", json_integer(a->share_pct));
    return o;
}
