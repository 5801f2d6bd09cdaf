/*
 * fm_lake_check (fleetml/lake.h): a round trip through the configured lake
 * backend, for operators (`fleetml lake check`) and tests: put an object
 * of random bytes, find it by name and by listing, read it back
 * byte-identical, delete it.
 */
#include "lake/lake_int.h"

#include <errno.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

typedef struct seen {
    const char *key;
    bool found;
} seen;

static int on_key(void *ud, const char *key)
{
    seen *s = ud;
    s->found |= strcmp(key, s->key) == 0;
    return 0;
}

/* SHA-256 of the rest of f. */
static int hash_file(FILE *f, unsigned char md[32], size_t *bytes)
{
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    unsigned char b[65536];
    size_t n;
    *bytes = 0;
    if (!c || EVP_DigestInit_ex(c, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(c);
        return FM_ECRYPTO;
    }
    while ((n = fread(b, 1, sizeof b, f)) > 0) {
        EVP_DigestUpdate(c, b, n);
        *bytes += n;
    }
    unsigned int l = 0;
    int rc = ferror(f) ? FM_EIO : EVP_DigestFinal_ex(c, md, &l) == 1 ? 0 : FM_ECRYPTO;
    EVP_MD_CTX_free(c);
    return rc;
}

int fm_lake_check(const fm_config *cfg, size_t bytes, fm_lake_check_report *rep,
                  fm_errbuf *err)
{
    memset(rep, 0, sizeof *rep);
    fm_lake *l = NULL;
    int rc = fm_lake_open(cfg, &l, err);
    if (rc)
        return rc;
    snprintf(rep->backend, sizeof rep->backend, "%s", l->vt->name);
    snprintf(rep->key, sizeof rep->key, "_check/%s-%lld.bin", cfg->node_id,
             (long long)fm_wall_ms());
    char spool[PATH_MAX + 64];
    snprintf(spool, sizeof spool, "%s/check-%d.tmp", l->spool_dir, (int)getpid());
    FILE *f = fopen(spool, "wb");
    unsigned char want[32], got[32], b[65536];
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    if (!f || !c || EVP_DigestInit_ex(c, EVP_sha256(), NULL) != 1) {
        rc = fm_errf(err, FM_EIO, "lake check: cannot write %s: %s", spool, strerror(errno));
        goto out;
    }
    for (size_t left = bytes; left;) {
        size_t n = left < sizeof b ? left : sizeof b;
        if (RAND_bytes(b, (int)n) != 1 || fwrite(b, 1, n, f) != n) {
            rc = fm_errf(err, FM_EIO, "lake check: cannot write %s", spool);
            goto out;
        }
        EVP_DigestUpdate(c, b, n);
        left -= n;
    }
    unsigned int ml = 0;
    EVP_DigestFinal_ex(c, want, &ml);
    if (fclose(f) != 0) {
        f = NULL;
        rc = fm_errf(err, FM_EIO, "lake check: cannot write %s", spool);
        goto out;
    }
    f = NULL;
    int64_t t0 = (int64_t)(fm_mono_ns() / 1000000);
    if ((rc = l->vt->put(l, rep->key, spool, err)))
        goto out;
    rep->put_ms = (int64_t)(fm_mono_ns() / 1000000) - t0;
    if (l->vt->exists(l, rep->key) != 1) {
        rc = fm_errf(err, FM_EIO, "lake check: %s is not there after put", rep->key);
        goto out;
    }
    seen s = {.key = rep->key};
    if ((rc = l->vt->list(l, "_check/", on_key, &s, err)))
        goto out;
    if (!s.found) {
        rc = fm_errf(err, FM_EIO, "lake check: %s is missing from the listing", rep->key);
        goto out;
    }
    t0 = (int64_t)(fm_mono_ns() / 1000000);
    if ((rc = l->vt->open_read(l, rep->key, &f, err)))
        goto out;
    size_t n = 0;
    rc = hash_file(f, got, &n);
    rep->get_ms = (int64_t)(fm_mono_ns() / 1000000) - t0;
    if (rc || n != bytes || memcmp(want, got, 32) != 0) {
        rc = fm_errf(err, FM_EIO, "lake check: %s read back differs (%zu bytes of %zu)",
                     rep->key, n, bytes);
        goto out;
    }
    rep->bytes = bytes;
    if ((rc = l->vt->remove(l, rep->key, err)))
        goto out;
    if (l->vt->exists(l, rep->key) != 0)
        rc = fm_errf(err, FM_EIO, "lake check: %s still there after delete", rep->key);
out:
    if (f)
        fclose(f);
    EVP_MD_CTX_free(c);
    unlink(spool);
    fm_lake_close(l);
    return rc;
}
