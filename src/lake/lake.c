/*
 * Lake front end: backend dispatch, object naming and the rolling policy.
 * The naming and rolling code is pure so the unit tests can pin down the
 * partition boundaries without touching a filesystem.
 */
#include "lake/lake_int.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

int fm_lake_open(const fm_config *cfg, fm_lake **out, fm_errbuf *err)
{
    *out = NULL;
    /* Callers never branch on the backend: they get an fm_lake whose vtable
     * does the work. */
    if (strcmp(cfg->lake_backend, "fs") == 0)
        return lake__fs_open(cfg, out, err);
    if (strcmp(cfg->lake_backend, "s3") == 0)
        return lake__s3_open(cfg, out, err);
    return fm_errf(err, FM_EINVAL, "lake.backend: unknown backend '%s' (expected fs or s3)",
                   cfg->lake_backend);
}

/* Copies s into out replacing every byte outside [A-Za-z0-9_.-] by '_'.
 * This keeps tenant and node names from introducing path separators or
 * characters that object stores and Hive readers treat specially. An empty
 * name (a quarantined payload from an unknown device has no tenant) becomes
 * "_" so the partition value is never empty, which Hive readers reject. */
static int sanitise(char *out, size_t len, const char *s)
{
    size_t n = strlen(s);
    if (n == 0)
        s = "_", n = 1;
    if (n >= len)
        return FM_EINVAL;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        int ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                 c == '_' || c == '.' || c == '-';
        out[i] = ok ? (char)c : '_';
    }
    out[n] = '\0';
    return 0;
}

int lake__partition(char *buf, size_t len, const char *area, const char *tenant, int64_t ms)
{
    char t[256];
    if (!area || !*area || !tenant || sanitise(t, sizeof t, tenant) != 0)
        return FM_EINVAL;
    /* Floor division: a negative millisecond count still belongs to the
     * second before it (C division truncates toward zero). */
    int64_t sec = ms / 1000;
    if (ms % 1000 < 0)
        sec -= 1;
    time_t tt = (time_t)sec;
    struct tm tm;
    if (!gmtime_r(&tt, &tm))
        return FM_EINVAL;
    int n = snprintf(buf, len, "%s/tenant=%s/date=%04d-%02d-%02d/hour=%02d", area, t,
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour);
    return n < 0 || (size_t)n >= len ? FM_EINVAL : 0;
}

int fm_lake_object_key(char *buf, size_t len, const char *area, const char *tenant,
                       int64_t ms, const char *node, int64_t first_seq)
{
    char part[512], nd[128];
    if (first_seq < 0 || !node)
        return FM_EINVAL;
    int rc = lake__partition(part, sizeof part, area, tenant, ms);
    if (rc == 0)
        rc = sanitise(nd, sizeof nd, node);
    if (rc != 0)
        return rc;
    /* Twelve digits keep lexical order equal to seq order for the first
     * 10^12 rows, so a plain listing of a partition is in export order. */
    int n = snprintf(buf, len, "%s/%s-%012" PRId64 ".ndjson.gz", part, nd, first_seq);
    return n < 0 || (size_t)n >= len ? FM_EINVAL : 0;
}

int lake__key_node_is(const char *key, const char *node)
{
    char nd[128];
    if (sanitise(nd, sizeof nd, node) != 0)
        return 0;
    const char *base = strrchr(key, '/');
    base = base ? base + 1 : key;
    size_t n = strlen(nd);
    if (strncmp(base, nd, n) != 0 || base[n] != '-')
        return 0;
    /* Exactly "<node>-<digits>.ndjson.gz": node "a" must not claim "a-1-…". */
    const char *p = base + n + 1, *d = p;
    while (*p >= '0' && *p <= '9')
        p++;
    return p > d && strcmp(p, ".ndjson.gz") == 0;
}

int lake__key_first_seq(const char *key, int64_t *out)
{
    static const char suffix[] = ".ndjson.gz";
    size_t n = strlen(key), sl = sizeof suffix - 1;
    if (n < sl + 13 || strcmp(key + n - sl, suffix) != 0)
        return FM_EINVAL;
    /* The seq is the run of digits right before the suffix, after '-'. */
    const char *end = key + n - sl, *p = end;
    while (p > key && p[-1] >= '0' && p[-1] <= '9')
        p--;
    if (p == end || p == key || p[-1] != '-' || end - p > 18)
        return FM_EINVAL;
    int64_t v = 0;
    for (; p < end; p++)
        v = v * 10 + (*p - '0');
    *out = v;
    return 0;
}

int lake__key_tenant(const char *key, char *buf, size_t len)
{
    const char *p = strstr(key, "/tenant=");
    if (!p)
        return FM_EINVAL;
    p += strlen("/tenant=");
    size_t n = strcspn(p, "/");
    if (n == 0 || p[n] != '/' || n >= len)
        return FM_EINVAL;
    memcpy(buf, p, n);
    buf[n] = '\0';
    return 0;
}

int fm_lake_should_roll(const fm_lake_roll *p, const char *open_partition, long open_bytes,
                        int64_t open_since_ms, const char *row_partition, int64_t now_ms)
{
    /* Nothing open: nothing to close. */
    if (!open_partition || !*open_partition)
        return 0;
    /* row_partition NULL means "no new row, just a timer check". */
    if (row_partition && strcmp(open_partition, row_partition) != 0)
        return 1;
    if (p->roll_bytes > 0 && open_bytes >= p->roll_bytes)
        return 1;
    if (p->roll_ms > 0 && now_ms - open_since_ms >= p->roll_ms)
        return 1;
    return 0;
}
