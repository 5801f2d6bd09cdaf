/*
 * Registry administration shared by the CLI and the HTTP API: template
 * validation, claim-certificate issuance and desired-shadow updates. Each
 * is one function so both front ends enforce exactly the same rules.
 */
#include "fleetml/contract.h"
#include "fleetml/measurement.h"
#include "fleetml/pki.h"
#include "fleetml/registry.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define CLAIM_CERT_DAYS 3650

bool fm_template_name_valid(const char *s)
{
    size_t n = strlen(s);
    if (n < 2 || n > 63 || !((s[0] >= 'a' && s[0] <= 'z') || (s[0] >= '0' && s[0] <= '9')))
        return false;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') || *s == '-'))
            return false;
    return true;
}

int fm_template_check(const fm_template *t, fm_errbuf *err)
{
    if (!fm_template_name_valid(t->name))
        return fm_errf(err, FM_EINVAL, "template name must be 2-63 characters of a-z, 0-9, '-'");
    char probe[80];
    snprintf(probe, sizeof probe, "%s-x", t->device_prefix);
    if (!t->device_prefix[0] || !fm_device_id_valid(probe))
        return fm_errf(err, FM_EINVAL, "prefix '%s' cannot start a device id", t->device_prefix);
    if (t->cert_days < 1 || t->cert_days > 3650)
        return fm_errf(err, FM_EINVAL, "certificate lifetime must be 1..3650 days");
    if (t->rate_per_min < 0 || t->rate_per_min > 100000)
        return fm_errf(err, FM_EINVAL, "rate must be 0..100000 per minute (0 = unlimited)");
    if (t->hook[0] && strncmp(t->hook, "http://", 7) != 0 && strncmp(t->hook, "https://", 8) != 0 &&
        t->hook[0] != '/')
        return fm_errf(err, FM_EINVAL,
                       "hook must be an http(s) URL or an absolute path to an executable");
    return 0;
}

int fm_template_claim_cert(const fm_config *cfg, fm_store *st, const char *name,
                           const char *dir, char *serial, size_t serial_len, fm_errbuf *err)
{
    fm_template t;
    int rc = fm_store_template_get(st, name, &t);
    if (rc == FM_ENOTFOUND)
        return fm_errf(err, rc, "template '%s' does not exist", name);
    if (rc)
        return fm_errf(err, rc, "cannot read template '%s'", name);
    if (serial_len < 64)
        return fm_errf(err, FM_EINVAL, "serial buffer too small");
    char key[PATH_MAX + 16], crt[PATH_MAX + 16], ca_key[PATH_MAX], ca_crt[PATH_MAX], cn[80];
    snprintf(key, sizeof key, "%s/claim.key", dir);
    snprintf(crt, sizeof crt, "%s/claim.crt", dir);
    snprintf(cn, sizeof cn, "claim:%s", name);
    fm_config_path(cfg, "pki/ca.key", ca_key, sizeof ca_key);
    fm_config_path(cfg, "pki/ca.crt", ca_crt, sizeof ca_crt);
    fm_cert_req req = {.common_name = cn, .usage = FM_CERT_CLIENT, .days = CLAIM_CERT_DAYS};
    fm_ca *ca = NULL;
    rc = fm_mkdirs(dir, 0700) ? fm_errf(err, FM_EIO, "cannot create %s", dir) : 0;
    if (!rc)
        rc = fm_ca_load(ca_key, ca_crt, &ca, err);
    if (!rc)
        rc = fm_ca_issue_keypair(ca, &req, key, crt, serial, err);
    /* Only a recorded serial is accepted by the broker, so a certificate
     * whose registration failed is useless; remove it to avoid confusion. */
    if (!rc && (rc = fm_store_claim_cert_add(st, name, serial, err)) != 0) {
        unlink(key);
        unlink(crt);
    }
    fm_ca_free(ca);
    return rc;
}

int fm_shadow_set_desired(fm_store *st, const char *device_id, json_t *patch, fm_shadow *out,
                          fm_errbuf *err)
{
    memset(out, 0, sizeof *out);
    if (fm_json_too_deep(patch, FM_JSON_DEPTH_MAX))
        return fm_errf(err, FM_ERANGE, "the desired state is nested more than %d levels deep",
                       FM_JSON_DEPTH_MAX);
    /* Read-modify-write, conditional on the version read: the platform may
     * store a reported update in between, and then we merge again. */
    for (int attempt = 0; attempt < 10; attempt++) {
        fm_shadow_clear(out);
        int rc = fm_store_shadow_get(st, device_id, out);
        if (rc)
            return fm_errf(err, rc, "cannot read the shadow of '%s'", device_id);
        json_t *des = json_loads(out->desired, 0, NULL);
        char *text = NULL;
        if (des && fm_shadow_merge(des, patch) == 0)
            text = json_dumps(des, JSON_COMPACT | JSON_SORT_KEYS);
        json_decref(des);
        if (!text) {
            fm_shadow_clear(out);
            return fm_errf(err, FM_ENOMEM, "out of memory");
        }
        if (strlen(text) + strlen(out->reported) > FM_SHADOW_MAX_BYTES) {
            fm_free(text);
            fm_shadow_clear(out);
            return fm_errf(err, FM_ERANGE, "the shadow document would exceed %d bytes",
                           FM_SHADOW_MAX_BYTES);
        }
        int64_t ver = 0;
        rc = fm_store_shadow_put(st, device_id, text, out->reported, out->version, &ver, 1, err);
        fm_free(text);
        if (rc == FM_EBUSY)
            continue;
        fm_shadow_clear(out);
        if (rc)
            return rc;
        rc = fm_store_shadow_get(st, device_id, out);
        return rc ? fm_errf(err, rc, "cannot read the shadow of '%s'", device_id) : 0;
    }
    fm_shadow_clear(out);
    return fm_errf(err, FM_EBUSY, "the shadow kept changing; try again");
}
