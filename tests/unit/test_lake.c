/*
 * Lake unit tests: object naming, the rolling policy, the fs backend, and
 * end-to-end export from a real SQLite store including crash recovery and
 * injected fsync failures.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "store_backend.h"

#include <cmocka.h>

#include "fleetml/config.h"
#include "fleetml/lake.h"
#include "fleetml/metrics.h"
#include "fleetml/store.h"
#include "lake/lake_int.h"

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

/* 2026-11-26T23:59:59.999Z and the next millisecond. */
#define T_LAST_MS 1795737599999LL
#define T_NEXT_MS 1795737600000LL

/* ---- helpers ----------------------------------------------------------- */

/* snprintf that fails the test on truncation (and keeps gcc's truncation
 * analysis, which cannot know our paths are short, quiet). */
static void pfmt(char *buf, size_t len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, len, fmt, ap);
    va_end(ap);
    assert_true(n >= 0 && (size_t)n < len);
}

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

static void rm_rf(const char *dir) { nftw(dir, rm_cb, 16, FTW_DEPTH | FTW_PHYS); }

typedef struct fixture {
    char dir[256];
    fm_config cfg;
} fixture;

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    pfmt(f->dir, sizeof f->dir, "/tmp/fm-lake-XXXXXX");
    if (!mkdtemp(f->dir))
        return -1;
    fm_config_defaults(&f->cfg, f->dir);
    assert_int_equal(test_store_backend(&f->cfg), 0);
    pfmt(f->cfg.lake_dir, sizeof f->cfg.lake_dir, "%s/lake", f->dir);
    pfmt(f->cfg.lake_backend, sizeof f->cfg.lake_backend, "fs");
    pfmt(f->cfg.node_id, sizeof f->cfg.node_id, "node1");
    f->cfg.lake_roll_bytes = 64 * 1024 * 1024;
    f->cfg.lake_roll_seconds = 3600;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    fm_fsync_fail_next(0);
    rm_rf(f->dir);
    free(f);
    return 0;
}

/* Per-area counts of every seq found in published objects. */
#define MAXSEQ 256
typedef struct seen {
    int raw[MAXSEQ], quar[MAXSEQ], labels[MAXSEQ], logs[MAXSEQ];
    int objects;
    int bad_name; /* object whose name seq is not its first row's seq */
    int base64;   /* quarantine rows carrying payload_base64 */
    int embedded; /* raw rows whose measurement is an object */
} seen;

static seen *g_seen;

static void read_object(const char *path)
{
    gzFile gz = gzopen(path, "rb");
    assert_non_null(gz);
    char line[8192];
    int64_t first = -1;
    int is_raw = strstr(path, "/raw/") != NULL;
    int is_labels = strstr(path, "/labels/") != NULL;
    int is_logs = strstr(path, "/logs/") != NULL;
    while (gzgets(gz, line, sizeof line)) {
        json_error_t e;
        json_t *j = json_loads(line, 0, &e);
        assert_non_null(j);
        int64_t seq = json_integer_value(json_object_get(j, "seq"));
        assert_true(seq > 0 && seq < MAXSEQ);
        if (first < 0)
            first = seq;
        if (is_labels) {
            g_seen->labels[seq]++;
            assert_true(json_is_object(json_object_get(j, "outputs")));
            assert_true(json_is_string(json_object_get(j, "labelled_at")));
        } else if (is_logs) {
            g_seen->logs[seq]++;
            assert_true(json_is_object(json_object_get(j, "details")));
            assert_true(json_is_string(json_object_get(j, "at")));
        } else if (is_raw) {
            g_seen->raw[seq]++;
            if (json_is_object(json_object_get(j, "measurement")))
                g_seen->embedded++;
            assert_true(json_is_string(json_object_get(j, "received_at")));
        } else {
            g_seen->quar[seq]++;
            if (json_object_get(j, "payload_base64"))
                g_seen->base64++;
            assert_true(json_is_object(json_object_get(j, "error")));
        }
        json_decref(j);
    }
    gzclose(gz);
    int64_t name_seq = -1;
    const char *base = strrchr(path, '/') + 1;
    assert_int_equal(lake__key_first_seq(base, &name_seq), 0);
    if (name_seq != first)
        g_seen->bad_name++;
    g_seen->objects++;
}

static int walk_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)ftw;
    if (flag == FTW_F && strstr(p, "/.spool/") == NULL && strstr(p, ".ndjson.gz"))
        read_object(p);
    return 0;
}

static void scan_lake(fixture *f, seen *s)
{
    memset(s, 0, sizeof *s);
    g_seen = s;
    nftw(f->cfg.lake_dir, walk_cb, 16, FTW_PHYS);
}

/* Files in the spool dir other than the lock. */
static int spool_files(fixture *f)
{
    char p[512];
    pfmt(p, sizeof p, "%s/.spool", f->cfg.lake_dir);
    DIR *d = opendir(p);
    if (!d)
        return 0;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL)
        if (de->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

static fm_store *open_store(fixture *f)
{
    fm_store *s = NULL;
    fm_errbuf err = {{0}};
    int rc = fm_store_open(&f->cfg, &s, &err);
    if (rc != 0)
        fail_msg("store open: %s", err.msg);
    assert_int_equal(fm_store_tenant_ensure(s, "acme", &err), 0);
    assert_int_equal(fm_store_tenant_ensure(s, "beta co", &err), 0);
    fm_device d = {.status = FM_DEVICE_ACTIVE, .created_ms = 1};
    pfmt(d.id, sizeof d.id, "dev-a");
    pfmt(d.tenant, sizeof d.tenant, "acme");
    int r = fm_store_device_add(s, &d, &err);
    assert_true(r == 0 || r == FM_EEXIST);
    pfmt(d.id, sizeof d.id, "dev-b");
    pfmt(d.tenant, sizeof d.tenant, "beta co");
    r = fm_store_device_add(s, &d, &err);
    assert_true(r == 0 || r == FM_EEXIST);
    return s;
}

/* Commits n measurements; tenants alternate when mixed is set; received_ms
 * steps from base by step. Returns the last seq. */
static int64_t commit_rows(fm_store *s, int n, int mixed, int64_t base, int64_t step)
{
    static int counter;
    int64_t last = 0;
    for (int i = 0; i < n; i++) {
        char mid[32];
        pfmt(mid, sizeof mid, "m-%d", ++counter);
        int b = mixed && (i % 2);
        fm_record r = {
            .device_id = b ? "dev-b" : "dev-a",
            .tenant = b ? "beta co" : "acme",
            .measurement_id = mid,
            .received_ms = base + i * step,
            .taken_ms = base + i * step - 5,
            .payload = "{\"kind\":\"viscosity\",\"v\":1.5}",
            .result_json = "{\"ok\":true}",
            .model = "visc@1",
        };
        r.payload_len = strlen(r.payload);
        fm_errbuf err;
        assert_int_equal(fm_store_commit(s, &r, 1, NULL, 0, &err), 0);
        last = r.seq;
    }
    return last;
}

static void assert_each_once(const seen *s, int64_t max_raw, int64_t max_quar)
{
    for (int64_t i = 1; i < MAXSEQ; i++) {
        if (s->raw[i] != (i <= max_raw ? 1 : 0))
            fail_msg("raw seq %" PRId64 " seen %d times", i, s->raw[i]);
        if (s->quar[i] != (i <= max_quar ? 1 : 0))
            fail_msg("quarantine seq %" PRId64 " seen %d times", i, s->quar[i]);
    }
    assert_int_equal(s->bad_name, 0);
}

/* ---- naming -------------------------------------------------------------- */

static void test_key_basic(void **state)
{
    (void)state;
    char k[512];
    assert_int_equal(fm_lake_object_key(k, sizeof k, "raw", "acme", T_LAST_MS, "node1", 42), 0);
    assert_string_equal(k, "raw/tenant=acme/date=2026-11-26/hour=23/node1-000000000042.ndjson.gz");
    /* One millisecond later is the next day's hour 00. */
    assert_int_equal(fm_lake_object_key(k, sizeof k, "raw", "acme", T_NEXT_MS, "node1", 43), 0);
    assert_string_equal(k, "raw/tenant=acme/date=2026-11-27/hour=00/node1-000000000043.ndjson.gz");
    /* Early hours are zero-padded; the epoch and negative times floor. */
    assert_int_equal(fm_lake_object_key(k, sizeof k, "quarantine", "t", 3600000 + 5, "n", 1), 0);
    assert_string_equal(k, "quarantine/tenant=t/date=1970-01-01/hour=01/n-000000000001.ndjson.gz");
    assert_int_equal(fm_lake_object_key(k, sizeof k, "raw", "t", -1, "n", 7), 0);
    assert_string_equal(k, "raw/tenant=t/date=1969-12-31/hour=23/n-000000000007.ndjson.gz");
    /* Big seqs still fit and keep their digits. */
    assert_int_equal(fm_lake_object_key(k, sizeof k, "raw", "t", 0, "n", 123456789012345LL), 0);
    assert_non_null(strstr(k, "/n-123456789012345.ndjson.gz"));
}

static void test_key_sanitise(void **state)
{
    (void)state;
    char k[512];
    assert_int_equal(fm_lake_object_key(k, sizeof k, "raw", "../etc/pa ss=w", 0, "no/de", 1), 0);
    assert_string_equal(k, "raw/tenant=.._etc_pa_ss_w/date=1970-01-01/hour=00/no_de-000000000001.ndjson.gz");
    assert_int_equal(fm_lake_object_key(k, sizeof k, "quarantine", "", 0, "n", 1), 0);
    assert_string_equal(k, "quarantine/tenant=_/date=1970-01-01/hour=00/n-000000000001.ndjson.gz");
    /* Non-ASCII bytes are replaced one by one. */
    assert_int_equal(fm_lake_object_key(k, sizeof k, "raw", "caf\xc3\xa9", 0, "n", 1), 0);
    assert_non_null(strstr(k, "tenant=caf__/"));
}

static void test_key_errors(void **state)
{
    (void)state;
    char k[40];
    assert_int_equal(fm_lake_object_key(k, sizeof k, "raw", "acme", 0, "node1", 1), FM_EINVAL);
    char big[512];
    assert_int_equal(fm_lake_object_key(big, sizeof big, "raw", "acme", 0, "node1", -1),
                     FM_EINVAL);
    assert_int_equal(fm_lake_object_key(big, sizeof big, "", "acme", 0, "node1", 1), FM_EINVAL);
    int64_t seq = 0;
    assert_int_equal(lake__key_first_seq("a/b/n-000000000042.ndjson.gz", &seq), 0);
    assert_int_equal(seq, 42);
    assert_int_equal(lake__key_first_seq("a/b/n.ndjson.gz", &seq), FM_EINVAL);
    assert_int_equal(lake__key_first_seq("a/b/n-000000000042.json", &seq), FM_EINVAL);
}

/* ---- rolling ------------------------------------------------------------- */

static void test_roll(void **state)
{
    (void)state;
    fm_lake_roll p = {.roll_bytes = 1000, .roll_ms = 60000};
    const char *a = "raw/tenant=a/date=2026-11-26/hour=23";
    const char *b = "raw/tenant=a/date=2026-11-27/hour=00";
    /* Nothing open never rolls. */
    assert_int_equal(fm_lake_should_roll(&p, NULL, 5000, 0, a, 999999), 0);
    assert_int_equal(fm_lake_should_roll(&p, "", 5000, 0, a, 999999), 0);
    /* Same partition, small and young: keep appending. */
    assert_int_equal(fm_lake_should_roll(&p, a, 10, 1000, a, 2000), 0);
    /* Partition change (here: the hour boundary). */
    assert_int_equal(fm_lake_should_roll(&p, a, 10, 1000, b, 2000), 1);
    /* Size: at the limit rolls, just below does not. */
    assert_int_equal(fm_lake_should_roll(&p, a, 999, 1000, a, 2000), 0);
    assert_int_equal(fm_lake_should_roll(&p, a, 1000, 1000, a, 2000), 1);
    /* Age, measured from when the object was opened. */
    assert_int_equal(fm_lake_should_roll(&p, a, 10, 1000, a, 60999), 0);
    assert_int_equal(fm_lake_should_roll(&p, a, 10, 1000, a, 61000), 1);
    /* Timer checks (no row) look at age and size only. */
    assert_int_equal(fm_lake_should_roll(&p, a, 10, 1000, NULL, 2000), 0);
    assert_int_equal(fm_lake_should_roll(&p, a, 10, 1000, NULL, 61000), 1);
    assert_int_equal(fm_lake_should_roll(&p, a, 1000, 1000, NULL, 2000), 1);
    /* Limits <= 0 are disabled. */
    fm_lake_roll off = {0, 0};
    assert_int_equal(fm_lake_should_roll(&off, a, 1L << 40, 0, a, INT64_MAX / 2), 0);
}

/* ---- fs backend ------------------------------------------------------------ */

static void write_spool(const char *path, const char *text)
{
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    fputs(text, fp);
    fclose(fp);
}

static void test_fs_put(void **state)
{
    fixture *f = *state;
    fm_lake *l = NULL;
    fm_errbuf err = {{0}};
    assert_int_equal(fm_lake_open(&f->cfg, &l, &err), 0);
    char spool[600], dest[600];
    struct stat st;
    pfmt(spool, sizeof spool, "%s/x.gz", l->spool_dir);
    assert_int_equal(stat(l->spool_dir, &st), 0); /* created by open */

    const char *key = "raw/tenant=a/date=2026-11-26/hour=23/node1-000000000001.ndjson.gz";
    assert_int_equal(l->vt->exists(l, key), 0);
    write_spool(spool, "hello");
    assert_int_equal(fm_lake_put(l, key, spool, &err), 0);
    /* The spool file moved (not copied) into a freshly created partition. */
    assert_int_equal(stat(spool, &st), -1);
    pfmt(dest, sizeof dest, "%s/%s", f->cfg.lake_dir, key);
    assert_int_equal(stat(dest, &st), 0);
    assert_int_equal(st.st_size, 5);
    assert_int_equal(l->vt->exists(l, key), 1);
    /* Idempotent: a retry after the rename happened is a success. */
    assert_int_equal(fm_lake_put(l, key, spool, &err), 0);
    /* Replacing with the same key is atomic (rename over). */
    write_spool(spool, "hello");
    assert_int_equal(fm_lake_put(l, key, spool, &err), 0);
    /* A missing spool with no object is an error. */
    assert_int_not_equal(fm_lake_put(l, "raw/x/node1-000000000009.ndjson.gz", spool, &err), 0);
    /* Keys cannot escape the lake. */
    write_spool(spool, "x");
    assert_int_equal(fm_lake_put(l, "../evil.gz", spool, &err), FM_EINVAL);
    assert_int_equal(fm_lake_put(l, "/abs.gz", spool, &err), FM_EINVAL);
    assert_int_equal(fm_lake_put(l, "raw//x.gz", spool, &err), FM_EINVAL);
    assert_int_equal(l->vt->exists(l, "raw/../../x"), FM_EINVAL);
    fm_lake_close(l);

    fm_config bad = f->cfg;
    pfmt(bad.lake_backend, sizeof bad.lake_backend, "ftp");
    assert_int_equal(fm_lake_open(&bad, &l, &err), FM_EINVAL);
    assert_null(l);
    /* s3 without a bucket cannot work: refused when opened. */
    pfmt(bad.lake_backend, sizeof bad.lake_backend, "s3");
    assert_int_equal(fm_lake_open(&bad, &l, &err), FM_EINVAL);
    assert_non_null(strstr(err.msg, "lake.s3_bucket"));
    /* A start-up with an invalid lake configuration fails. */
    fm_lake_writer *w = NULL;
    assert_int_equal(fm_lake_writer_start(&bad, &w, &err), FM_EINVAL);
    assert_null(w);
}

typedef struct listed {
    char keys[8][200];
    int n;
} listed;

static int on_listed(void *ud, const char *key)
{
    listed *l = ud;
    if (l->n < 8)
        pfmt(l->keys[l->n], sizeof l->keys[0], "%s", key);
    l->n++;
    return 0;
}

/* The reading half of the fs backend: listing by prefix in key order (the
 * spool is never listed), reading, removing. */
static void test_fs_list_read_remove(void **state)
{
    fixture *f = *state;
    fm_lake *l = NULL;
    fm_errbuf err = {{0}};
    assert_int_equal(fm_lake_open(&f->cfg, &l, &err), 0);
    const char *keys[] = {"raw/tenant=b/date=2026-11-26/hour=01/n-000000000002.ndjson.gz",
                          "raw/tenant=a/date=2026-11-26/hour=23/n-000000000001.ndjson.gz",
                          "raw/tenant=ab/date=2026-11-26/hour=23/n-000000000003.ndjson.gz",
                          "labels/tenant=a/date=2026-11-26/hour=23/n-000000000001.ndjson.gz"};
    char spool[600];
    for (size_t i = 0; i < 4; i++) {
        pfmt(spool, sizeof spool, "%s/s%zu", l->spool_dir, i);
        write_spool(spool, keys[i]);
        assert_int_equal(fm_lake_put(l, keys[i], spool, &err), 0);
    }
    pfmt(spool, sizeof spool, "%s/in-flight", l->spool_dir);
    write_spool(spool, "x");
    listed got = {0};
    assert_int_equal(l->vt->list(l, "raw/", on_listed, &got, &err), 0);
    assert_int_equal(got.n, 3);
    assert_string_equal(got.keys[0], keys[1]); /* byte order: "a/" < "ab" < "b/" */
    assert_string_equal(got.keys[1], keys[2]);
    assert_string_equal(got.keys[2], keys[0]);
    /* A prefix ending inside a name filters on the name. */
    memset(&got, 0, sizeof got);
    assert_int_equal(l->vt->list(l, "raw/tenant=a", on_listed, &got, &err), 0);
    assert_int_equal(got.n, 2);
    memset(&got, 0, sizeof got);
    assert_int_equal(l->vt->list(l, "raw/tenant=a/", on_listed, &got, &err), 0);
    assert_int_equal(got.n, 1);
    memset(&got, 0, sizeof got);
    assert_int_equal(l->vt->list(l, "", on_listed, &got, &err), 0);
    assert_int_equal(got.n, 4); /* not the spool's file */
    memset(&got, 0, sizeof got);
    assert_int_equal(l->vt->list(l, "nothing/", on_listed, &got, &err), 0);
    assert_int_equal(got.n, 0);
    FILE *in = NULL;
    assert_int_equal(l->vt->open_read(l, keys[3], &in, &err), 0);
    char text[200] = "";
    assert_non_null(fgets(text, sizeof text, in));
    fclose(in);
    assert_string_equal(text, keys[3]);
    assert_int_equal(l->vt->open_read(l, "raw/none.gz", &in, &err), FM_ENOTFOUND);
    assert_int_equal(l->vt->open_read(l, "../x", &in, &err), FM_EINVAL);
    assert_int_equal(l->vt->remove(l, keys[3], &err), 0);
    assert_int_equal(l->vt->exists(l, keys[3]), 0);
    assert_int_equal(l->vt->remove(l, keys[3], &err), 0); /* absent: fine */
    fm_lake_close(l);
}

/* S3 settings that cannot work are refused when the lake opens, before
 * any request: bucket names, endpoints, credentials. */
static void test_s3_open_settings(void **state)
{
    fixture *f = *state;
    fm_config c = f->cfg;
    fm_lake *l = NULL;
    fm_errbuf err = {{0}};
    unsetenv("AWS_ACCESS_KEY_ID");
    unsetenv("AWS_SECRET_ACCESS_KEY");
    pfmt(c.lake_backend, sizeof c.lake_backend, "s3");
    pfmt(c.lake_s3_endpoint, sizeof c.lake_s3_endpoint, "http://127.0.0.1:9");
    const char *bad_buckets[] = {"ab", "Upper", "-dash", "dot.", "under_score"};
    for (size_t i = 0; i < 5; i++) {
        pfmt(c.lake_s3_bucket, sizeof c.lake_s3_bucket, "%s", bad_buckets[i]);
        assert_int_equal(fm_lake_open(&c, &l, &err), FM_EINVAL);
    }
    pfmt(c.lake_s3_bucket, sizeof c.lake_s3_bucket, "lake");
    assert_int_equal(fm_lake_open(&c, &l, &err), FM_EINVAL); /* no credentials */
    assert_non_null(strstr(err.msg, "credentials"));
    setenv("AWS_ACCESS_KEY_ID", "AK", 1);
    setenv("AWS_SECRET_ACCESS_KEY", "SK", 1);
    assert_int_equal(fm_lake_open(&c, &l, &err), 0); /* from the environment */
    assert_string_equal(l->vt->name, "s3");
    fm_lake_close(l);
    const char *bad_eps[] = {"ftp://h", "http://", "http://h/path", "h:9000", "http://u@h"};
    for (size_t i = 0; i < 5; i++) {
        pfmt(c.lake_s3_endpoint, sizeof c.lake_s3_endpoint, "%s", bad_eps[i]);
        assert_int_equal(fm_lake_open(&c, &l, &err), FM_EINVAL);
        assert_non_null(strstr(err.msg, "lake.s3_endpoint"));
    }
    /* Dotted buckets cannot be host names under TLS. */
    pfmt(c.lake_s3_endpoint, sizeof c.lake_s3_endpoint, "https://s3.example");
    pfmt(c.lake_s3_bucket, sizeof c.lake_s3_bucket, "a.b.c");
    pfmt(c.lake_s3_addressing, sizeof c.lake_s3_addressing, "virtual");
    assert_int_equal(fm_lake_open(&c, &l, &err), FM_EINVAL);
    pfmt(c.lake_s3_addressing, sizeof c.lake_s3_addressing, "path");
    assert_int_equal(fm_lake_open(&c, &l, &err), 0);
    fm_lake_close(l);
    unsetenv("AWS_ACCESS_KEY_ID");
    unsetenv("AWS_SECRET_ACCESS_KEY");
}

/* ---- end to end -------------------------------------------------------------- */

/* The lake object log (lake.object.created): what the export settled. */
typedef struct objlog {
    int n;
    char key[24][512];
    char tenant[24][64];
    char area[24][16];
    int64_t rows[24], seq[24];
} objlog;

static int on_obj(void *ud, const fm_lake_object *o)
{
    objlog *g = ud;
    if (g->n < 24) {
        pfmt(g->key[g->n], sizeof g->key[0], "%s", o->key);
        pfmt(g->tenant[g->n], sizeof g->tenant[0], "%s", o->tenant);
        pfmt(g->area[g->n], sizeof g->area[0], "%s", o->area);
        g->rows[g->n] = o->rows;
        g->seq[g->n] = o->seq;
    }
    g->n++;
    return 0;
}

static void read_objlog(fm_store *s, objlog *g)
{
    memset(g, 0, sizeof *g);
    assert_int_equal(fm_store_lake_objects(s, 0, 100, on_obj, g), 0);
    for (int i = 1; i < g->n && i < 24; i++)
        assert_true(g->seq[i] > g->seq[i - 1]);
}

/* Index of key in the log, or -1; fails when it is there more than once. */
static int logged(const objlog *g, const char *key)
{
    int at = -1;
    for (int i = 0; i < g->n && i < 24; i++)
        if (strcmp(g->key[i], key) == 0) {
            assert_int_equal(at, -1);
            at = i;
        }
    return at;
}

static void test_export_e2e(void **state)
{
    fixture *f = *state;
    fm_store *s = open_store(f);
    fm_errbuf err = {{0}};
    /* Interleaved tenants across an hour boundary. */
    int64_t last = commit_rows(s, 10, 1, T_LAST_MS - 4, 1);
    assert_int_equal(last, 10);
    /* Quarantine: one text payload, one binary one, one unknown device. */
    fm_quarantine q[3] = {
        {.device_id = "dev-a", .tenant = "acme", .received_ms = T_LAST_MS, .payload = "{oops",
         .payload_len = 5, .error_code = "malformed_json", .error_message = "bad"},
        {.device_id = "dev-a", .tenant = "acme", .received_ms = T_LAST_MS, .payload = "\xff\x00\x01",
         .payload_len = 3, .error_code = "malformed_json", .error_message = "binary"},
        {.device_id = "ghost", .tenant = "", .received_ms = T_LAST_MS, .payload = "{}",
         .payload_len = 2, .error_code = "unknown_device", .error_message = "who"},
    };
    assert_int_equal(fm_store_commit(s, NULL, 0, q, 3, &err), 0);

    uint64_t objs0 = fm_metrics_get()->lake_objects;
    int rc = fm_lake_export_all(&f->cfg, &err);
    if (rc != 0)
        fail_msg("export: %s", err.msg);
    seen sn;
    scan_lake(f, &sn);
    assert_each_once(&sn, 10, 3);
    assert_int_equal(sn.embedded, 10);
    assert_int_equal(sn.base64, 1);
    /* raw: acme 23h, beta 23h, acme 00h, beta 00h; quarantine: acme, "_". */
    assert_int_equal(sn.objects, 6);
    assert_int_equal(fm_metrics_get()->lake_objects - objs0, 6);
    assert_int_equal(fm_metrics_get()->lake_backlog, 0);
    char p[600];
    struct stat st;
    pfmt(p, sizeof p,
             "%s/raw/tenant=beta_co/date=2026-11-27/hour=00/node1-000000000006.ndjson.gz",
             f->cfg.lake_dir);
    assert_int_equal(stat(p, &st), 0);
    pfmt(p, sizeof p,
             "%s/quarantine/tenant=_/date=2026-11-26/hour=23/node1-000000000003.ndjson.gz",
             f->cfg.lake_dir);
    assert_int_equal(stat(p, &st), 0);
    /* Every object was logged once, with its tenant, area and rows, in the
     * transaction that settled its cursor. */
    objlog g;
    read_objlog(s, &g);
    assert_int_equal(g.n, 6);
    int64_t rows = 0;
    fm_lake *l = NULL;
    assert_int_equal(fm_lake_open(&f->cfg, &l, &err), 0);
    for (int i = 0; i < g.n; i++) {
        assert_int_equal(l->vt->exists(l, g.key[i]), 1);
        assert_int_equal(logged(&g, g.key[i]), i);
        char want[80];
        pfmt(want, sizeof want, "%s/tenant=", g.area[i]);
        assert_true(strncmp(g.key[i], want, strlen(want)) == 0);
        assert_true(strcmp(g.tenant[i], "acme") == 0 || strcmp(g.tenant[i], "beta co") == 0 ||
                    strcmp(g.tenant[i], "") == 0);
        assert_true(g.rows[i] > 0);
        rows += g.rows[i];
    }
    fm_lake_close(l);
    assert_int_equal(rows, 13);
    int64_t max = 0;
    assert_int_equal(fm_store_lake_objects_max(s, &max), 0);
    assert_int_equal(max, g.seq[5]);
    assert_int_equal(logged(&g, "raw/tenant=beta_co/date=2026-11-27/hour=00/"
                                "node1-000000000006.ndjson.gz") >= 0, 1);

    fm_lake_cursor c;
    assert_int_equal(fm_store_lake_cursor_get(s, FM_LAKE_CURSOR_OWNER, FM_STREAM_RAW, &c), 0);
    assert_int_equal(c.last_seq, 10);
    assert_string_equal(c.pending_key, "");

    /* Nothing new: a second export publishes nothing. More rows go into
     * new objects only. */
    assert_int_equal(fm_lake_export_all(&f->cfg, &err), 0);
    scan_lake(f, &sn);
    assert_int_equal(sn.objects, 6);
    commit_rows(s, 3, 0, T_NEXT_MS + 10, 1);
    assert_int_equal(fm_lake_export_all(&f->cfg, &err), 0);
    scan_lake(f, &sn);
    assert_each_once(&sn, 13, 3);
    assert_int_equal(spool_files(f), 0);
    read_objlog(s, &g);
    assert_int_equal(g.n, 7); /* the second export published nothing */
    assert_int_equal(g.rows[6], 3);
    fm_store_close(s);
}

/* Nodes sharing one database: only the lease holder exports, the cursor is
 * the cluster's, a database exported under a node's own cursor is taken
 * over without re-exporting, and a pending object another node named is
 * settled from the lake (never from a local file that happens to have its
 * spool's name). */
static void make_spool(const char *path, int64_t from, int64_t to);

static void test_export_cluster_lease(void **state)
{
    fixture *f = *state;
    fm_store *s = open_store(f);
    fm_errbuf err = {{0}};
    /* An older database: node1's own cursor says rows 1..3 are exported. */
    commit_rows(s, 5, 0, T_LAST_MS - 100, 1);
    fm_lake_cursor c = {.last_seq = 3};
    assert_int_equal(fm_store_lake_cursor_set(s, "node1", FM_STREAM_RAW, &c, &err), 0);

    /* node2 holds the export: node1 exports nothing and says who does. */
    assert_int_equal(fm_store_lease(s, FM_LAKE_LEASE, "node2", 60000, NULL, 0), 0);
    assert_int_equal(fm_lake_export_all(&f->cfg, &err), FM_EBUSY);
    assert_non_null(strstr(err.msg, "node2"));
    seen sn;
    scan_lake(f, &sn);
    assert_int_equal(sn.objects, 0);

    /* Released: node1 takes the lease, adopts its cursor (rows 4..5 only),
     * and hands the lease back when done. */
    assert_int_equal(fm_store_lease(s, FM_LAKE_LEASE, "node2", 0, NULL, 0), 0);
    assert_int_equal(fm_lake_export_all(&f->cfg, &err), 0);
    scan_lake(f, &sn);
    assert_int_equal(sn.objects, 1);
    for (int i = 1; i <= 5; i++)
        assert_int_equal(sn.raw[i], i >= 4 ? 1 : 0);
    assert_int_equal(fm_store_lake_cursor_get(s, FM_LAKE_CURSOR_OWNER, FM_STREAM_RAW, &c), 0);
    assert_int_equal(c.last_seq, 5);
    assert_int_equal(fm_store_lease(s, FM_LAKE_LEASE, "node3", 60000, NULL, 0), 0);
    assert_int_equal(fm_store_lease(s, FM_LAKE_LEASE, "node3", 0, NULL, 0), 0);

    /* node2 committed a batch (rows 6..7) and died before its put; a file
     * here has the name of node2's spool but other rows in it. node1 must
     * re-export 6..7 from the store, not publish that file. */
    commit_rows(s, 2, 0, T_LAST_MS - 50, 1);
    fm_lake *l = NULL;
    assert_int_equal(fm_lake_open(&f->cfg, &l, &err), 0);
    c.last_seq = 7;
    assert_int_equal(fm_lake_object_key(c.pending_key, sizeof c.pending_key, "raw", "acme",
                                        T_LAST_MS - 50, "node2", 6), 0);
    pfmt(c.pending_spool, sizeof c.pending_spool, "%s/raw-000000000006.ndjson.gz",
         l->spool_dir);
    make_spool(c.pending_spool, 100, 101);
    assert_int_equal(fm_store_lake_cursor_set(s, FM_LAKE_CURSOR_OWNER, FM_STREAM_RAW, &c, &err),
                     0);
    assert_int_equal(fm_lake_export_all(&f->cfg, &err), 0);
    assert_int_equal(l->vt->exists(l, c.pending_key), 0);
    scan_lake(f, &sn);
    for (int i = 1; i < MAXSEQ; i++)
        assert_int_equal(sn.raw[i], i >= 4 && i <= 7 ? 1 : 0);
    assert_int_equal(sn.bad_name, 0);
    assert_int_equal(spool_files(f), 0);
    assert_int_equal(fm_store_lake_cursor_get(s, FM_LAKE_CURSOR_OWNER, FM_STREAM_RAW, &c), 0);
    assert_int_equal(c.last_seq, 7);
    assert_string_equal(c.pending_key, "");
    fm_lake_close(l);
    fm_store_close(s);
}

/* A raw object bigger than one gzip member (256 KiB of NDJSON) is written
 * as several members that read back as one gzip stream, and payloads with
 * line breaks between their tokens still give one line per row. */
static void test_export_members_and_line_breaks(void **state)
{
    fixture *f = *state;
    fm_store *s = open_store(f);
    fm_errbuf err = {{0}};
    enum { ROWS = 120 };
    static char payload[3300];
    size_t n = 0;
    n += (size_t)snprintf(payload + n, sizeof payload - n, "{\n\"pad\":[");
    while (n < sizeof payload - 40)
        n += (size_t)snprintf(payload + n, sizeof payload - n, "1.25,\r\n");
    n += (size_t)snprintf(payload + n, sizeof payload - n, "0],\r\n\"v\":1}");
    for (int i = 0; i < ROWS; i++) {
        char mid[32];
        pfmt(mid, sizeof mid, "big-%d", i);
        fm_record r = {.device_id = "dev-a", .tenant = "acme", .measurement_id = mid,
                       .received_ms = T_LAST_MS - 100, .taken_ms = T_LAST_MS - 200,
                       .payload = payload, .payload_len = n, .result_json = "{\"ok\":true}",
                       .model = "visc@1"};
        assert_int_equal(fm_store_commit(s, &r, 1, NULL, 0, &err), 0);
    }
    assert_true((size_t)ROWS * n > 256 * 1024);
    if (fm_lake_export_all(&f->cfg, &err) != 0)
        fail_msg("export: %s", err.msg);
    seen sn;
    scan_lake(f, &sn); /* every line must parse as one JSON row */
    assert_each_once(&sn, ROWS, 0);
    assert_int_equal(sn.embedded, ROWS);
    assert_int_equal(sn.objects, 1);
    fm_store_close(s);
}

static void test_export_roll_size(void **state)
{
    fixture *f = *state;
    f->cfg.lake_roll_bytes = 300; /* about two rows per object */
    fm_store *s = open_store(f);
    fm_errbuf err = {{0}};
    commit_rows(s, 9, 0, T_LAST_MS - 100, 1);
    assert_int_equal(fm_lake_export_all(&f->cfg, &err), 0);
    seen sn;
    scan_lake(f, &sn);
    assert_each_once(&sn, 9, 0);
    assert_true(sn.objects >= 3);
    fm_store_close(s);
}

/* Gzips NDJSON lines for raw seqs [from, to] into path, as a writer that
 * crashed after committing the cursor would have left it. */
static void make_spool(const char *path, int64_t from, int64_t to)
{
    gzFile gz = gzopen(path, "wb");
    assert_non_null(gz);
    for (int64_t i = from; i <= to; i++)
        gzprintf(gz, "{\"seq\":%" PRId64 ",\"received_at\":\"x\",\"measurement\":{}}\n", i);
    gzclose(gz);
}

static void test_recover_pending_spool(void **state)
{
    fixture *f = *state;
    fm_store *s = open_store(f);
    fm_errbuf err = {{0}};
    commit_rows(s, 6, 0, T_LAST_MS - 100, 1);
    /* Crash between cursor_set(pending) and put: the spool holds 1..4. */
    fm_lake *l = NULL;
    assert_int_equal(fm_lake_open(&f->cfg, &l, &err), 0);
    fm_lake_cursor c = {.last_seq = 4};
    assert_int_equal(fm_lake_object_key(c.pending_key, sizeof c.pending_key, "raw", "acme",
                                        T_LAST_MS - 100, "node1", 1), 0);
    pfmt(c.pending_spool, sizeof c.pending_spool, "%s/raw-000000000001.ndjson.gz",
             l->spool_dir);
    make_spool(c.pending_spool, 1, 4);
    assert_int_equal(fm_store_lake_cursor_set(s, FM_LAKE_CURSOR_OWNER, FM_STREAM_RAW, &c, &err), 0);
    /* Plus a stale, never-committed partial object for rows 5..6. */
    char stale[600];
    pfmt(stale, sizeof stale, "%s/raw-000000000005.ndjson.gz", l->spool_dir);
    make_spool(stale, 5, 6);

    assert_int_equal(fm_lake_export_all(&f->cfg, &err), 0);
    seen sn;
    scan_lake(f, &sn);
    assert_each_once(&sn, 6, 0);
    assert_int_equal(sn.objects, 2);
    assert_int_equal(l->vt->exists(l, c.pending_key), 1);
    assert_int_equal(spool_files(f), 0);
    assert_int_equal(fm_store_lake_cursor_get(s, FM_LAKE_CURSOR_OWNER, FM_STREAM_RAW, &c), 0);
    assert_int_equal(c.last_seq, 6);
    assert_string_equal(c.pending_key, "");
    assert_string_equal(c.pending_spool, "");
    /* The recovered object is logged (its rows no longer known), then the
     * rows after it in an object of their own. */
    objlog g;
    read_objlog(s, &g);
    assert_int_equal(g.n, 2);
    char first[512];
    assert_int_equal(fm_lake_object_key(first, sizeof first, "raw", "acme", T_LAST_MS - 100,
                                        "node1", 1), 0);
    assert_int_equal(logged(&g, first), 0);
    assert_int_equal(g.rows[0], -1);
    assert_string_equal(g.tenant[0], "acme");
    assert_int_equal(g.rows[1], 2);

    /* Crash after the put but before the pending fields were cleared: the
     * spool is gone and the object is there: nothing to redo. */
    commit_rows(s, 2, 0, T_LAST_MS - 50, 1); /* 7, 8 */
    c.last_seq = 8;
    assert_int_equal(fm_lake_object_key(c.pending_key, sizeof c.pending_key, "raw", "acme",
                                        T_LAST_MS - 50, "node1", 7), 0);
    pfmt(c.pending_spool, sizeof c.pending_spool, "%s/raw-000000000007.ndjson.gz",
             l->spool_dir);
    make_spool(c.pending_spool, 7, 8);
    assert_int_equal(fm_lake_put(l, c.pending_key, c.pending_spool, &err), 0);
    assert_int_equal(fm_store_lake_cursor_set(s, FM_LAKE_CURSOR_OWNER, FM_STREAM_RAW, &c, &err), 0);
    assert_int_equal(fm_lake_export_all(&f->cfg, &err), 0);
    scan_lake(f, &sn);
    assert_each_once(&sn, 8, 0);
    read_objlog(s, &g);
    assert_int_equal(g.n, 3);
    assert_int_equal(logged(&g, c.pending_key), 2); /* found in the lake: logged */

    /* A pending object whose spool and object are both missing (the cursor
     * write reported failure but committed, and the spool was dropped):
     * recovery rewinds so rows 9..10 are exported once. */
    commit_rows(s, 2, 0, T_LAST_MS - 40, 1);
    c.last_seq = 10;
    assert_int_equal(fm_lake_object_key(c.pending_key, sizeof c.pending_key, "raw", "acme",
                                        T_LAST_MS - 40, "node1", 9), 0);
    pfmt(c.pending_spool, sizeof c.pending_spool, "%s/raw-000000000009.ndjson.gz",
             l->spool_dir);
    assert_int_equal(fm_store_lake_cursor_set(s, FM_LAKE_CURSOR_OWNER, FM_STREAM_RAW, &c, &err), 0);
    assert_int_equal(fm_lake_export_all(&f->cfg, &err), 0);
    scan_lake(f, &sn);
    assert_each_once(&sn, 10, 0);
    /* The missing object is not logged; its rows' new object is. */
    read_objlog(s, &g);
    assert_int_equal(g.n, 4);
    assert_int_equal(logged(&g, c.pending_key), 3);
    assert_int_equal(g.rows[3], 2);
    fm_lake_close(l);
    fm_store_close(s);
}

static void test_recover_manifest(void **state)
{
    fixture *f = *state;
    fm_store *s = open_store(f);
    fm_errbuf err = {{0}};
    commit_rows(s, 4, 1, T_LAST_MS - 100, 1); /* acme 1,3; beta 2,4 */
    fm_lake *l = NULL;
    assert_int_equal(fm_lake_open(&f->cfg, &l, &err), 0);
    char ka[512], kb[512], sa[600], sb[600], man[600], text[2048];
    assert_int_equal(fm_lake_object_key(ka, sizeof ka, "raw", "acme", T_LAST_MS - 100, "node1", 1), 0);
    assert_int_equal(fm_lake_object_key(kb, sizeof kb, "raw", "beta co", T_LAST_MS - 99, "node1", 2), 0);
    pfmt(sa, sizeof sa, "%s/raw-000000000001.ndjson.gz", l->spool_dir);
    pfmt(sb, sizeof sb, "%s/raw-000000000002.ndjson.gz", l->spool_dir);
    pfmt(man, sizeof man, "%s/raw-000000000001.manifest", l->spool_dir);
    /* Crash in the middle of putting a two-object batch: the acme object
     * was put, the beta one was not. */
    gzFile gz = gzopen(sa, "wb");
    gzprintf(gz, "{\"seq\":1,\"received_at\":\"x\"}\n{\"seq\":3,\"received_at\":\"x\"}\n");
    gzclose(gz);
    gz = gzopen(sb, "wb");
    gzprintf(gz, "{\"seq\":2,\"received_at\":\"x\"}\n{\"seq\":4,\"received_at\":\"x\"}\n");
    gzclose(gz);
    pfmt(text, sizeof text, "%s\t%s\n%s\t%s\n", ka, sa, kb, sb);
    assert_int_equal(fm_write_file_atomic(man, text, strlen(text), 0644), 0);
    assert_int_equal(fm_lake_put(l, ka, sa, &err), 0);
    fm_lake_cursor c = {.last_seq = 4};
    pfmt(c.pending_key, sizeof c.pending_key, "%s", ka);
    pfmt(c.pending_spool, sizeof c.pending_spool, "%s", man);
    assert_int_equal(fm_store_lake_cursor_set(s, FM_LAKE_CURSOR_OWNER, FM_STREAM_RAW, &c, &err), 0);

    assert_int_equal(fm_lake_export_all(&f->cfg, &err), 0);
    seen sn;
    scan_lake(f, &sn);
    assert_each_once(&sn, 4, 0);
    assert_int_equal(sn.objects, 2);
    assert_int_equal(spool_files(f), 0);
    assert_int_equal(fm_store_lake_cursor_get(s, FM_LAKE_CURSOR_OWNER, FM_STREAM_RAW, &c), 0);
    assert_int_equal(c.last_seq, 4);
    assert_string_equal(c.pending_key, "");
    /* Both objects of the batch are logged once, each with its tenant. */
    objlog g;
    read_objlog(s, &g);
    assert_int_equal(g.n, 2);
    assert_int_equal(logged(&g, ka), 0);
    assert_int_equal(logged(&g, kb), 1);
    assert_string_equal(g.tenant[1], "beta co"); /* its first row's, not the key's */
    assert_int_equal(g.rows[1], -1);
    fm_lake_close(l);
    fm_store_close(s);
}

static void test_fsync_failure(void **state)
{
    fixture *f = *state;
    fm_store *s = open_store(f);
    fm_errbuf err = {{0}};
    commit_rows(s, 5, 1, T_LAST_MS - 100, 1);
    uint64_t errs0 = fm_metrics_get()->lake_errors;
    fm_fsync_fail_next(1);
    assert_int_not_equal(fm_lake_export_all(&f->cfg, &err), 0);
    fm_fsync_fail_next(0);
    assert_true(fm_metrics_get()->lake_errors > errs0);
    fm_lake_cursor c;
    assert_int_equal(fm_store_lake_cursor_get(s, FM_LAKE_CURSOR_OWNER, FM_STREAM_RAW, &c), 0);
    assert_int_equal(c.last_seq, 0);
    assert_string_equal(c.pending_key, "");
    seen sn;
    scan_lake(f, &sn);
    assert_int_equal(sn.objects, 0);
    assert_int_equal(spool_files(f), 0); /* the partial objects were dropped */
    assert_int_equal(fm_metrics_get()->lake_backlog, 5);

    /* The retry exports everything exactly once. */
    assert_int_equal(fm_lake_export_all(&f->cfg, &err), 0);
    scan_lake(f, &sn);
    assert_each_once(&sn, 5, 0);
    fm_store_close(s);
}

/* The lake cannot take the object (a file blocks the partition directory,
 * standing in for an unwritable or full lake, and working even as root).
 * The put fails after the cursor committed the pending object: the export
 * reports the error, the spool file is kept, and the next run finishes the
 * publication without duplicating or losing a row. */
static void test_put_failure(void **state)
{
    fixture *f = *state;
    fm_store *s = open_store(f);
    fm_errbuf err = {{0}};
    commit_rows(s, 3, 0, T_LAST_MS - 100, 1);
    assert_int_equal(fm_lake_export_all(&f->cfg, &err), 0);
    commit_rows(s, 2, 0, T_NEXT_MS + 1, 1); /* 4, 5: next day */
    char block[600];
    pfmt(block, sizeof block, "%s/raw/tenant=acme/date=2026-11-27", f->cfg.lake_dir);
    write_spool(block, "in the way");
    uint64_t errs0 = fm_metrics_get()->lake_errors;
    assert_int_not_equal(fm_lake_export_all(&f->cfg, &err), 0);
    assert_true(fm_metrics_get()->lake_errors > errs0);
    assert_int_equal(spool_files(f), 1);
    /* A second attempt while still blocked fails the same way and keeps
     * the pending object. */
    assert_int_not_equal(fm_lake_export_all(&f->cfg, &err), 0);
    assert_int_equal(spool_files(f), 1);
    unlink(block);
    assert_int_equal(fm_lake_export_all(&f->cfg, &err), 0);
    seen sn;
    scan_lake(f, &sn);
    assert_each_once(&sn, 5, 0);
    assert_int_equal(spool_files(f), 0);
    fm_lake_cursor c;
    assert_int_equal(fm_store_lake_cursor_get(s, FM_LAKE_CURSOR_OWNER, FM_STREAM_RAW, &c), 0);
    assert_int_equal(c.last_seq, 5);
    assert_string_equal(c.pending_key, "");
    fm_store_close(s);
}

static void test_writer_thread(void **state)
{
    fixture *f = *state;
    fm_store *s = open_store(f);
    fm_errbuf err = {{0}};
    commit_rows(s, 3, 0, T_LAST_MS - 100, 1);
    fm_lake_writer *w = NULL;
    int rc = fm_lake_writer_start(&f->cfg, &w, &err);
    if (rc != 0)
        fail_msg("start: %s", err.msg);
    /* The writer holds the lake: a concurrent one-shot export is refused. */
    assert_int_equal(fm_lake_export_all(&f->cfg, &err), FM_EBUSY);
    commit_rows(s, 4, 1, T_LAST_MS - 50, 1);
    fm_lake_writer_notify(w);
    assert_int_equal(fm_lake_writer_flush(w), 0);
    seen sn;
    scan_lake(f, &sn);
    assert_each_once(&sn, 7, 0);
    /* Rows committed after the flush are published by stop. */
    commit_rows(s, 2, 0, T_LAST_MS - 10, 1);
    fm_lake_writer_notify(w);
    fm_lake_writer_stop(w);
    scan_lake(f, &sn);
    assert_each_once(&sn, 9, 0);
    assert_int_equal(fm_metrics_get()->lake_backlog, 0);
    /* The lock is released on stop. */
    assert_int_equal(fm_lake_export_all(&f->cfg, &err), 0);
    fm_store_close(s);
}

static void test_writer_age_roll(void **state)
{
    fixture *f = *state;
    f->cfg.lake_roll_seconds = 1;
    fm_store *s = open_store(f);
    fm_errbuf err = {{0}};
    fm_lake_writer *w = NULL;
    assert_int_equal(fm_lake_writer_start(&f->cfg, &w, &err), 0);
    commit_rows(s, 3, 0, T_LAST_MS - 100, 1);
    fm_lake_writer_notify(w);
    /* Without any flush the object is published once it is ~1 s old. */
    seen sn;
    for (int i = 0; i < 50; i++) {
        usleep(100 * 1000);
        scan_lake(f, &sn);
        if (sn.objects > 0)
            break;
    }
    assert_each_once(&sn, 3, 0);
    fm_lake_writer_stop(w);
    fm_store_close(s);
}


/* Copies the measurement id of dev-a's first row into ud (char[32]). */
static int first_of_dev_a(void *ud, const fm_record *r)
{
    if (strcmp(r->device_id, "dev-a") != 0)
        return 0;
    pfmt(ud, 32, "%s", r->measurement_id);
    return 1;
}

/* Labels and audit entries are exported to labels/ and logs/, partitioned
 * by their tenant and time, each with its own cursor; a label written again
 * after an export is exported again (the lake keeps both versions). */
static void test_export_labels_logs(void **state)
{
    fixture *f = *state;
    fm_store *s = open_store(f);
    fm_errbuf err = {{0}};
    commit_rows(s, 2, 1, T_LAST_MS - 10, 1); /* dev-a (acme), dev-b (beta co) */
    fm_label l = {.device_id = "dev-a", .tenant = "acme",
                  .outputs_json = "{\"viscosity\":1.25}", .source = "lab", .labelled_by = "alice",
                  .at_ms = T_LAST_MS};
    /* commit_rows numbers measurement ids across tests: look dev-a's up. */
    char mid[32] = "";
    assert_int_equal(fm_store_scan_records(s, 0, 10, first_of_dev_a, mid), 0);
    assert_true(mid[0] != '\0');
    l.measurement_id = mid;
    assert_int_equal(fm_store_label_put(s, &l, &err), 0);
    fm_audit a1 = {.at_ms = T_NEXT_MS, .tenant = "acme", .actor = "user:acme/alice",
                   .action = "label.put", .target = "measurement:dev-a", .outcome = "ok",
                   .client = "127.0.0.1", .details_json = "{\"k\":\"v\"}"};
    fm_audit a2 = {.at_ms = T_LAST_MS, .tenant = "", .actor = "anonymous",
                   .action = "auth.login", .target = "", .outcome = "denied", .client = ""};
    assert_int_equal(fm_store_audit_append(s, &a1, &err), 0);
    assert_int_equal(fm_store_audit_append(s, &a2, &err), 0);

    int rc = fm_lake_export_all(&f->cfg, &err);
    if (rc != 0)
        fail_msg("export: %s", err.msg);
    seen sn;
    scan_lake(f, &sn);
    assert_each_once(&sn, 2, 0);
    assert_int_equal(sn.labels[1], 1);
    assert_int_equal(sn.logs[1], 1);
    assert_int_equal(sn.logs[2], 1);
    assert_int_equal(sn.bad_name, 0);
    assert_int_equal(sn.objects, 2 + 1 + 2);
    char p[600];
    struct stat st;
    pfmt(p, sizeof p, "%s/labels/tenant=acme/date=2026-11-26/hour=23/node1-000000000001.ndjson.gz",
         f->cfg.lake_dir);
    assert_int_equal(stat(p, &st), 0);
    /* The object holds the store's document as one NDJSON line. */
    gzFile gz = gzopen(p, "rb");
    assert_non_null(gz);
    char line[2048];
    assert_non_null(gzgets(gz, line, sizeof line));
    assert_null(gzgets(gz, line + 1024, 1024));
    gzclose(gz);
    json_t *j = json_loads(line, 0, NULL);
    assert_non_null(j);
    assert_string_equal(json_string_value(json_object_get(j, "device_id")), "dev-a");
    assert_string_equal(json_string_value(json_object_get(j, "measurement_id")), mid);
    assert_string_equal(json_string_value(json_object_get(j, "labelled_at")),
                        "2026-11-26T23:59:59.999Z");
    assert_true(json_real_value(json_object_get(json_object_get(j, "outputs"), "viscosity")) ==
                1.25);
    json_decref(j);
    pfmt(p, sizeof p, "%s/logs/tenant=acme/date=2026-11-27/hour=00/node1-000000000001.ndjson.gz",
         f->cfg.lake_dir);
    assert_int_equal(stat(p, &st), 0);
    pfmt(p, sizeof p, "%s/logs/tenant=_/date=2026-11-26/hour=23/node1-000000000002.ndjson.gz",
         f->cfg.lake_dir);
    assert_int_equal(stat(p, &st), 0);

    fm_lake_cursor c;
    assert_int_equal(fm_store_lake_cursor_get(s, FM_LAKE_CURSOR_OWNER, FM_STREAM_LABELS, &c), 0);
    assert_int_equal(c.last_seq, 1);
    assert_string_equal(c.pending_key, "");
    assert_int_equal(fm_store_lake_cursor_get(s, FM_LAKE_CURSOR_OWNER, FM_STREAM_AUDIT, &c), 0);
    assert_int_equal(c.last_seq, 2);
    assert_int_equal(fm_metrics_get()->lake_backlog, 0);

    /* Nothing new: nothing published. A correction is a new row. */
    assert_int_equal(fm_lake_export_all(&f->cfg, &err), 0);
    scan_lake(f, &sn);
    assert_int_equal(sn.objects, 5);
    l.outputs_json = "{\"viscosity\":1.3}";
    l.at_ms = T_LAST_MS - 1;
    assert_int_equal(fm_store_label_put(s, &l, &err), 0);
    assert_int_equal(l.seq, 2);
    assert_int_equal(fm_lake_export_all(&f->cfg, &err), 0);
    scan_lake(f, &sn);
    assert_int_equal(sn.objects, 6);
    assert_int_equal(sn.labels[1], 1);
    assert_int_equal(sn.labels[2], 1);
    assert_int_equal(sn.logs[1] + sn.logs[2], 2);
    assert_int_equal(spool_files(f), 0);
    fm_store_close(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_key_basic),
        cmocka_unit_test(test_key_sanitise),
        cmocka_unit_test(test_key_errors),
        cmocka_unit_test(test_roll),
        cmocka_unit_test_setup_teardown(test_fs_put, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fs_list_read_remove, setup, teardown),
        cmocka_unit_test_setup_teardown(test_s3_open_settings, setup, teardown),
        cmocka_unit_test_setup_teardown(test_export_e2e, setup, teardown),
        cmocka_unit_test_setup_teardown(test_export_cluster_lease, setup, teardown),
        cmocka_unit_test_setup_teardown(test_export_members_and_line_breaks, setup, teardown),
        cmocka_unit_test_setup_teardown(test_export_roll_size, setup, teardown),
        cmocka_unit_test_setup_teardown(test_recover_pending_spool, setup, teardown),
        cmocka_unit_test_setup_teardown(test_recover_manifest, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fsync_failure, setup, teardown),
        cmocka_unit_test_setup_teardown(test_put_failure, setup, teardown),
        cmocka_unit_test_setup_teardown(test_writer_thread, setup, teardown),
        cmocka_unit_test_setup_teardown(test_writer_age_roll, setup, teardown),
        cmocka_unit_test_setup_teardown(test_export_labels_logs, setup, teardown),
    };
    fm_log_set_level(FM_LOG_ERROR);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
