/*
 * Where a rule delivers (fleetml/rules.h): a webhook (HTTPS POST signed
 * with HMAC-SHA256), a function of this node, the shadow of the event's
 * device, or an object in the lake. Each delivery either succeeds or
 * returns an error the engine retries; none is half-done in a way a retry
 * would make worse (a webhook or lake object may be delivered twice, which
 * at-least-once allows and the event id lets the consumer see).
 */
#include "functions/rules_int.h"
#include "fleetml/functions.h"
#include "fleetml/registry.h"

#include <curl/curl.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---- webhook ------------------------------------------------------------------- */

static size_t discard(char *p, size_t size, size_t n, void *ud)
{
    (void)p;
    (void)ud;
    return size * n;
}

int rules__signature(const char *secret, const char *timestamp, const char *body, char *hex,
                     size_t hex_len)
{
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int mac_len = 0;
    size_t tl = strlen(timestamp), bl = strlen(body);
    /* The signed text is "<timestamp>.<body>", so a captured body cannot be
     * replayed with a fresh timestamp. */
    char *msg = fm_malloc(tl + 1 + bl + 1);
    if (!msg)
        return FM_ENOMEM;
    memcpy(msg, timestamp, tl);
    msg[tl] = '.';
    memcpy(msg + tl + 1, body, bl + 1);
    unsigned char *ok = HMAC(EVP_sha256(), secret, (int)strlen(secret), (unsigned char *)msg,
                             tl + 1 + bl, mac, &mac_len);
    fm_free(msg);
    if (!ok || hex_len < mac_len * 2 + 1)
        return FM_ECRYPTO;
    for (unsigned i = 0; i < mac_len; i++)
        snprintf(hex + 2 * i, 3, "%02x", mac[i]);
    return 0;
}

static int webhook(rules_ctx *c, json_t *target, json_t *event, const char *body,
                   fm_errbuf *err)
{
    /* Checked again here: a rule stored while loopback webhooks were
     * allowed does not outlive the setting. */
    const char *url = json_string_value(json_object_get(target, "url"));
    if (strncmp(url, "https://", 8) != 0 && !(c->loopback_webhooks && fm_rule_loopback_url(url)))
        return fm_errf(err, FM_EPERM, "webhook: plain http is not allowed here");
    if (!c->curl && !(c->curl = curl_easy_init()))
        return fm_errf(err, FM_ENOMEM, "out of memory");
    CURL *h = c->curl;
    curl_easy_reset(h);
    char ts[24], sig[2 * EVP_MAX_MD_SIZE + 1], hdr[4][256];
    snprintf(ts, sizeof ts, "%lld", (long long)(fm_wall_ms() / 1000));
    if (rules__signature(json_string_value(json_object_get(target, "secret")), ts, body, sig,
                         sizeof sig) != 0)
        return fm_errf(err, FM_ECRYPTO, "cannot sign the body");
    snprintf(hdr[0], sizeof hdr[0], "X-Fleetml-Signature: sha256=%s", sig);
    snprintf(hdr[1], sizeof hdr[1], "X-Fleetml-Timestamp: %s", ts);
    snprintf(hdr[2], sizeof hdr[2], "X-Fleetml-Event-Id: %s",
             json_string_value(json_object_get(event, "id")));
    snprintf(hdr[3], sizeof hdr[3], "X-Fleetml-Event-Type: %s",
             json_string_value(json_object_get(event, "type")));
    struct curl_slist *headers = curl_slist_append(NULL, "Content-Type: application/json");
    for (int i = 0; i < 4; i++)
        headers = curl_slist_append(headers, hdr[i]);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)json_integer_value(json_object_get(target, "timeout_ms")));
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, 5000L);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L); /* a redirect must not carry the body on */
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, discard);
    curl_easy_setopt(h, CURLOPT_USERAGENT, "fleetml-rules/1");
    CURLcode cc = curl_easy_perform(h);
    long status = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_slist_free_all(headers);
    if (cc != CURLE_OK)
        return fm_errf(err, FM_EUNAVAIL, "webhook: %s", curl_easy_strerror(cc));
    if (status < 200 || status > 299)
        return fm_errf(err, FM_EUNAVAIL, "webhook: HTTP %ld", status);
    return 0;
}

/* ---- lake ---------------------------------------------------------------------- */

/* Writes text as an object under key (via a spool file, as the exporter
 * does, so the object appears whole). */
int rules__lake_put(rules_ctx *c, const char *key, const char *text, fm_errbuf *err)
{
    if (!c->lake)
        return fm_errf(err, FM_EUNAVAIL, "no lake");
    char spool[PATH_MAX];
    if ((size_t)snprintf(spool, sizeof spool, "%s/rules-XXXXXX", c->lake->spool_dir) >=
        sizeof spool)
        return fm_errf(err, FM_EINVAL, "spool path too long");
    int fd = mkstemp(spool);
    if (fd < 0)
        return fm_errf(err, FM_EIO, "cannot create a spool file in %s", c->lake->spool_dir);
    int rc = fm_write_full(fd, text, strlen(text));
    if (!rc && fsync(fd) != 0)
        rc = FM_EIO;
    close(fd);
    if (rc) {
        unlink(spool);
        return fm_errf(err, rc, "cannot write the spool file");
    }
    rc = fm_lake_put(c->lake, key, spool, err);
    if (rc)
        unlink(spool);
    return rc;
}

/* "<prefix>/tenant=<t>/date=YYYY-MM-DD/<event id>[-<n>].json", the id's
 * ':' turned into '-' (keys stay portable across backends). */
int rules__object_key(char *buf, size_t len, const char *prefix, json_t *event, int n)
{
    char id[160];
    snprintf(id, sizeof id, "%s", json_string_value(json_object_get(event, "id")));
    for (char *p = id; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '.' || *p == '-' ||
              *p == '_'))
            *p = '-';
    const char *tenant = json_string_value(json_object_get(event, "tenant"));
    time_t t = (time_t)(fm_wall_ms() / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    int w = n > 0 ? snprintf(buf, len, "%s/tenant=%s/date=%04d-%02d-%02d/%s-%d.json", prefix,
                             tenant && *tenant ? tenant : "_", tm.tm_year + 1900, tm.tm_mon + 1,
                             tm.tm_mday, id, n)
                  : snprintf(buf, len, "%s/tenant=%s/date=%04d-%02d-%02d/%s.json", prefix,
                             tenant && *tenant ? tenant : "_", tm.tm_year + 1900, tm.tm_mon + 1,
                             tm.tm_mday, id);
    return w > 0 && (size_t)w < len ? 0 : FM_EINVAL;
}

/* ---- one delivery -------------------------------------------------------------- */

int rules__deliver(rules_ctx *c, json_t *target, json_t *event, json_t *outputs,
                   fm_errbuf *err)
{
    const char *type = json_string_value(json_object_get(target, "type"));
    size_t i;
    json_t *out;
    json_array_foreach(outputs, i, out) {
        char *body = json_dumps(out, JSON_COMPACT | JSON_ENCODE_ANY);
        if (!body)
            return fm_errf(err, FM_ENOMEM, "out of memory");
        int rc = 0;
        if (strcmp(type, "webhook") == 0) {
            rc = webhook(c, target, event, body, err);
        } else if (strcmp(type, "function") == 0) {
            const char *name = json_string_value(json_object_get(target, "function"));
            fm_fn_pool *p = fm_fn_registry_get(c->functions, name);
            char *result = NULL;
            rc = p ? fm_fn_call(p, body, &result, NULL, err)
                   : fm_errf(err, FM_EUNAVAIL, "no function '%s' on this node", name);
            fm_free(result);
        } else if (strcmp(type, "shadow") == 0) {
            /* The event's device gets the output as a merge patch of its
             * desired state; every node then sends it the delta. */
            const char *device = json_string_value(
                json_object_get(json_object_get(event, "data"), "device"));
            if (!device)
                rc = fm_errf(err, FM_EINVAL, "shadow: the event names no device");
            else if (!json_is_object(out))
                rc = fm_errf(err, FM_EINVAL, "shadow: the transform must give an object");
            else {
                fm_shadow sh = {0};
                rc = fm_shadow_set_desired(c->st, device, out, &sh, err);
                fm_shadow_clear(&sh);
            }
        } else if (strcmp(type, "lake") == 0) {
            char key[512];
            rc = rules__object_key(key, sizeof key, json_string_value(json_object_get(target, "prefix")),
                                   event, json_array_size(outputs) > 1 ? (int)i + 1 : 0);
            rc = rc ? fm_errf(err, rc, "lake: key too long")
                    : rules__lake_put(c, key, body, err);
        } else {
            rc = fm_errf(err, FM_EINVAL, "unknown target type");
        }
        free(body);
        if (rc)
            return rc;
    }
    return 0;
}
