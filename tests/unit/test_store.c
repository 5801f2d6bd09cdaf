/*
 * Store (SQLite backend) tests: schema creation, catalogue operations,
 * group commit with rollback on failure, dedupe lookups, scans and lake
 * cursors.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "fleetml/config.h"
#include "fleetml/store.h"
#include "fleetml/drift.h"
#include "fleetml/fault.h"
#include "fleetml/metrics.h"

#include <ftw.h>
#include <jansson.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "store/sqlite_int.h"
#include "store_backend.h"

typedef struct fx {
    char dir[64];
    fm_config cfg;
    fm_store *st;
} fx;

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

static int setup(void **state)
{
    fx *f = calloc(1, sizeof *f);
    snprintf(f->dir, sizeof f->dir, "/tmp/fm-store-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    assert_int_equal(fm_config_defaults(&f->cfg, f->dir), 0);
    assert_int_equal(test_store_backend(&f->cfg), 0);
    fm_errbuf err;
    if (fm_store_open(&f->cfg, &f->st, &err) != 0)
        fail_msg("store open: %s", err.msg);
    assert_int_equal(fm_store_tenant_ensure(f->st, "t1", &err), 0);
    fm_device d = {.id = "dev-1", .tenant = "t1", .status = FM_DEVICE_ACTIVE};
    assert_int_equal(fm_store_device_add(f->st, &d, &err), 0);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fx *f = *state;
    fm_store_close(f->st);
    nftw(f->dir, rm_cb, 8, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

static fm_record rec(const char *mid, const char *result)
{
    return (fm_record){.device_id = "dev-1", .tenant = "t1", .measurement_id = mid,
                       .received_ms = 1000, .taken_ms = 900, .payload = "{\"id\":1}",
                       .payload_len = 8, .result_json = result, .model = "m@1"};
}

static void test_catalogue(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    fm_device d;
    assert_int_equal(fm_store_device_get(f->st, "dev-1", &d), 0);
    assert_string_equal(d.tenant, "t1");
    assert_int_equal(d.status, FM_DEVICE_ACTIVE);
    assert_int_equal(fm_store_device_get(f->st, "nope", &d), FM_ENOTFOUND);
    fm_device dup = {.id = "dev-1", .tenant = "t1"};
    assert_int_equal(fm_store_device_add(f->st, &dup, &err), FM_EEXIST);
    fm_device orphan = {.id = "dev-2", .tenant = "no-such-tenant"};
    assert_int_equal(fm_store_device_add(f->st, &orphan, &err), FM_ENOTFOUND);
    assert_int_equal(fm_store_device_set_status(f->st, "dev-1", FM_DEVICE_DISABLED, &err), 0);
    assert_int_equal(fm_store_device_get(f->st, "dev-1", &d), 0);
    assert_int_equal(d.status, FM_DEVICE_DISABLED);
    assert_int_equal(fm_store_device_set_status(f->st, "nope", 0, &err), FM_ENOTFOUND);
    /* tenant_ensure is idempotent; users are unique per tenant */
    assert_int_equal(fm_store_tenant_ensure(f->st, "t1", &err), 0);
    long n = -1;
    assert_int_equal(fm_store_user_count(f->st, "t1", &n), 0);
    assert_int_equal(n, 0);
    assert_int_equal(fm_store_user_create(f->st, "t1", "alice", "h", "admin", &err), 0);
    assert_int_equal(fm_store_user_create(f->st, "t1", "alice", "h", "admin", &err), FM_EEXIST);
    assert_int_equal(fm_store_user_count(f->st, "t1", &n), 0);
    assert_int_equal(n, 1);
}

static void test_commit_and_lookup(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    fm_record r[2] = {rec("a", "{\"r\":\"a\"}"), rec("b", "{\"r\":\"b\"}")};
    fm_quarantine q = {.device_id = "dev-1", .tenant = "t1", .received_ms = 5,
                       .payload = "\xff\x00junk", .payload_len = 6, .error_code = "malformed_json",
                       .error_message = "bad"};
    assert_int_equal(fm_store_commit(f->st, r, 2, &q, 1, &err), 0);
    assert_true(r[0].seq > 0 && r[1].seq == r[0].seq + 1);
    assert_true(q.seq > 0);
    char *res = NULL;
    assert_int_equal(fm_store_result_lookup(f->st, "dev-1", "b", &res), 0);
    assert_string_equal(res, "{\"r\":\"b\"}");
    fm_free(res);
    assert_int_equal(fm_store_result_lookup(f->st, "dev-1", "zzz", &res), FM_ENOTFOUND);
    long n;
    assert_int_equal(fm_store_count_measurements(f->st, "dev-1", &n), 0);
    assert_int_equal(n, 2);
    int64_t max;
    assert_int_equal(fm_store_max_seq(f->st, FM_STREAM_RAW, &max), 0);
    assert_int_equal(max, r[1].seq);
    assert_int_equal(fm_store_max_seq(f->st, FM_STREAM_QUARANTINE, &max), 0);
    assert_int_equal(max, q.seq);
}

/* Dedupe by key: a record whose (device, id) is already stored is skipped
 * and marked existed, its stored result untouched; the others are written. */
static void test_commit_skips_stored_keys(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    fm_record first = rec("x", "{\"first\":1}");
    assert_int_equal(fm_store_commit(f->st, &first, 1, NULL, 0, &err), 0);
    assert_false(first.existed);
    assert_true(first.seq > 0);
    fm_record batch[3] = {rec("y", "{}"), rec("x", "{\"second\":2}"), rec("z", "{}")};
    assert_int_equal(fm_store_commit(f->st, batch, 3, NULL, 0, &err), 0);
    assert_false(batch[0].existed);
    assert_true(batch[1].existed);
    assert_int_equal(batch[1].seq, 0);
    assert_false(batch[2].existed);
    assert_true(batch[0].seq > first.seq && batch[2].seq > batch[0].seq);
    long n;
    assert_int_equal(fm_store_count_measurements(f->st, "dev-1", &n), 0);
    assert_int_equal(n, 3);
    char *res = NULL;
    assert_int_equal(fm_store_result_lookup(f->st, "dev-1", "x", &res), 0);
    assert_string_equal(res, "{\"first\":1}");
    fm_free(res);
}

typedef struct scan_acc {
    int64_t seqs[16];
    int n;
    int stop_after;
} scan_acc;

static int on_rec(void *ud, const fm_record *r)
{
    scan_acc *a = ud;
    a->seqs[a->n++] = r->seq;
    assert_string_equal(r->model, "m@1");
    assert_int_equal(r->payload_len, 8);
    return a->stop_after && a->n >= a->stop_after;
}

static void test_scan_and_cursor(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    fm_record r[4] = {rec("1", "{}"), rec("2", "{}"), rec("3", "{}"), rec("4", "{}")};
    assert_int_equal(fm_store_commit(f->st, r, 4, NULL, 0, &err), 0);
    scan_acc a = {0};
    assert_int_equal(fm_store_scan_records(f->st, r[0].seq, 10, on_rec, &a), 0);
    assert_int_equal(a.n, 3);
    assert_int_equal(a.seqs[0], r[1].seq);
    scan_acc b = {.stop_after = 2};
    assert_int_equal(fm_store_scan_records(f->st, 0, 10, on_rec, &b), 0);
    assert_int_equal(b.n, 2);
    scan_acc c = {0};
    assert_int_equal(fm_store_scan_records(f->st, 0, 1, on_rec, &c), 0);
    assert_int_equal(c.n, 1);

    fm_lake_cursor cur;
    assert_int_equal(fm_store_lake_cursor_get(f->st, "n1", FM_STREAM_RAW, &cur), 0);
    assert_int_equal(cur.last_seq, 0);
    assert_string_equal(cur.pending_key, "");
    fm_lake_cursor set = {.last_seq = 3};
    snprintf(set.pending_key, sizeof set.pending_key, "raw/k");
    snprintf(set.pending_spool, sizeof set.pending_spool, "/s");
    assert_int_equal(fm_store_lake_cursor_set(f->st, "n1", FM_STREAM_RAW, &set, &err), 0);
    assert_int_equal(fm_store_lake_cursor_get(f->st, "n1", FM_STREAM_RAW, &cur), 0);
    assert_int_equal(cur.last_seq, 3);
    assert_string_equal(cur.pending_key, "raw/k");
    /* streams and nodes are independent */
    assert_int_equal(fm_store_lake_cursor_get(f->st, "n1", FM_STREAM_QUARANTINE, &cur), 0);
    assert_int_equal(cur.last_seq, 0);
    assert_int_equal(fm_store_lake_cursor_get(f->st, "n2", FM_STREAM_RAW, &cur), 0);
    assert_int_equal(cur.last_seq, 0);

    /* Settling a cursor logs its objects in the same transaction: all of
     * it, or (an object the log refuses) none of it. */
    fm_lake_cursor done = {.last_seq = 3};
    fm_lake_object objs[2] = {{.tenant = "t1", .area = "raw", .key = "raw/a", .rows = 2},
                              {.tenant = "t2", .area = "raw", .key = "raw/b", .rows = -1}};
    int64_t max = -1;
    assert_int_equal(fm_store_lake_objects_max(f->st, &max), 0);
    assert_int_equal(max, 0);
    assert_int_equal(fm_store_lake_settle(f->st, "n1", FM_STREAM_RAW, &done, objs, 2, &err), 0);
    assert_int_equal(fm_store_lake_cursor_get(f->st, "n1", FM_STREAM_RAW, &cur), 0);
    assert_string_equal(cur.pending_key, "");
    assert_int_equal(fm_store_lake_objects_max(f->st, &max), 0);
    assert_true(max >= 2);
    fm_lake_cursor next = {.last_seq = 9};
    fm_lake_object bad = {.tenant = "t1", .area = NULL, .key = "raw/c", .rows = 1};
    assert_int_not_equal(fm_store_lake_settle(f->st, "n1", FM_STREAM_RAW, &next, &bad, 1, &err),
                         0);
    assert_int_equal(fm_store_lake_cursor_get(f->st, "n1", FM_STREAM_RAW, &cur), 0);
    assert_int_equal(cur.last_seq, 3);
    int64_t max2 = -1;
    assert_int_equal(fm_store_lake_objects_max(f->st, &max2), 0);
    assert_int_equal(max2, max);
}

/* Reopening the same database keeps the data and migrates idempotently. */
static void test_reopen(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    fm_record r = rec("keep", "{\"k\":1}");
    assert_int_equal(fm_store_commit(f->st, &r, 1, NULL, 0, &err), 0);
    fm_store_close(f->st);
    assert_int_equal(fm_store_open(&f->cfg, &f->st, &err), 0);
    char *res = NULL;
    assert_int_equal(fm_store_result_lookup(f->st, "dev-1", "keep", &res), 0);
    assert_string_equal(res, "{\"k\":1}");
    fm_free(res);
}

/* Commits one measurement with a 3.3 KB payload (a sweep's size). */
static void commit_sized(fx *f, int i)
{
    static char payload[3300];
    if (!payload[0])
        memset(payload, 'x', sizeof payload - 1);
    char mid[32];
    snprintf(mid, sizeof mid, "w%06d", i);
    fm_record r = rec(mid, "{\"r\":1}");
    r.payload = payload;
    r.payload_len = sizeof payload - 1;
    fm_errbuf err;
    assert_int_equal(fm_store_commit(f->st, &r, 1, NULL, 0, &err), 0);
    assert_int_equal(r.existed, 0);
}

static void nap_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* The pipeline's handle: its WAL is checkpointed by a thread of its own,
 * and the log restarts from its beginning without a checkpoint ever
 * running on the committing thread. */
static void test_hot_path_checkpoints_beside_commits(void **state)
{
    fx *f = *state;
    assert_int_equal(fm_store_hot_path(f->st), 0);
    if (test_store_is_pg())
        return; /* the server checkpoints by itself */
    fm_metrics *mx = fm_metrics_get();
    uint64_t bg0 = atomic_load(&mx->wal_ckpt_background);
    uint64_t inl0 = atomic_load(&mx->wal_ckpt_bound);
    uint64_t rs0 = atomic_load(&mx->wal_restarts);
    /* 80 commits of a sweep: over a mebibyte of log, which wakes the
     * checkpointer; then one commit every 10 ms until the log restarts
     * (the next commit after a pass that caught up), for at most 20 s. */
    int n = 0;
    for (; n < 80; n++)
        commit_sized(f, n);
    for (int tries = 0; atomic_load(&mx->wal_restarts) == rs0 && tries < 2000; tries++) {
        nap_ms(10);
        commit_sized(f, n++);
    }
    assert_true(atomic_load(&mx->wal_restarts) > rs0);
    assert_true(atomic_load(&mx->wal_ckpt_background) > bg0);
    assert_int_equal(atomic_load(&mx->wal_ckpt_bound), inl0);
    long stored = 0;
    assert_int_equal(fm_store_count_measurements(f->st, "dev-1", &stored), 0);
    assert_int_equal(stored, n);
}

/* A reader that keeps an old snapshot pins the log: the background passes
 * cannot copy past it, so the committing thread checkpoints once the log
 * reaches its bound; once the reader is gone the writer's idle moment
 * restarts the log and the WAL file is back within its limit. */
static void test_hot_path_log_is_bounded(void **state)
{
    fx *f = *state;
    if (test_store_is_pg())
        return;
    assert_int_equal(fm_store_hot_path(f->st), 0);
    char path[600];
    snprintf(path, sizeof path, "%s/db/fleetml.db", f->dir);
    sqlite3 *reader = NULL;
    assert_int_equal(sqlite3_open_v2(path, &reader, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(reader, "SELECT seq FROM measurements", -1, &st, NULL),
                     SQLITE_OK);
    commit_sized(f, 0);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW); /* the snapshot is held from here */
    fm_metrics *mx = fm_metrics_get();
    uint64_t inl0 = atomic_load(&mx->wal_ckpt_bound);
    /* About 6 log frames a commit: 1,000 commits pass the 4,096-frame bound. */
    int n = 1;
    for (; n < 1000 && atomic_load(&mx->wal_ckpt_bound) == inl0; n++)
        commit_sized(f, n);
    assert_true(atomic_load(&mx->wal_ckpt_bound) > inl0);
    sqlite3_finalize(st);
    sqlite3_close(reader);
    /* With the reader gone, the writer's idle moment copies the log (no
     * commit can land meanwhile), so the log restarts; the file is cut
     * back to journal_size_limit (16 MiB) then. */
    uint64_t idle0 = atomic_load(&mx->wal_ckpt_idle);
    uint64_t rs0 = atomic_load(&mx->wal_restarts);
    assert_int_equal(fm_store_idle(f->st), 0);
    assert_int_equal(atomic_load(&mx->wal_ckpt_idle), idle0 + 1);
    assert_int_equal(fm_store_idle(f->st), 0); /* nothing new: no second pass */
    assert_int_equal(atomic_load(&mx->wal_ckpt_idle), idle0 + 1);
    for (int tries = 0; atomic_load(&mx->wal_restarts) == rs0 && tries < 2000; tries++) {
        nap_ms(10);
        commit_sized(f, n++);
    }
    assert_true(atomic_load(&mx->wal_restarts) > rs0);
    char wal[620];
    snprintf(wal, sizeof wal, "%s-wal", path);
    struct stat sb;
    assert_int_equal(stat(wal, &sb), 0);
    assert_true(sb.st_size <= 17 * 1024 * 1024);
    long stored = 0;
    assert_int_equal(fm_store_count_measurements(f->st, "dev-1", &stored), 0);
    assert_int_equal(stored, n);
}

static void test_probe_write(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    assert_int_equal(fm_store_probe_write(f->st, &err), 0);
    assert_int_equal(fm_store_probe_write(f->st, &err), 0);
}

static void test_unknown_backend(void **state)
{
    (void)state;
    fm_config cfg;
    fm_config_defaults(&cfg, "/tmp");
    snprintf(cfg.store_backend, sizeof cfg.store_backend, "nosuch");
    fm_store *st = NULL;
    fm_errbuf err;
    assert_int_equal(fm_store_open(&cfg, &st, &err), FM_EINVAL);
    assert_null(st);
}


/* ---- API data: presence, pages, labels, audit, lake documents ---------- */

static void add_device(fx *f, const char *id, const char *tenant, const char *model,
                       const char *fw)
{
    fm_errbuf err;
    assert_int_equal(fm_store_tenant_ensure(f->st, tenant, &err), 0);
    fm_device d = {.status = FM_DEVICE_ACTIVE};
    snprintf(d.id, sizeof d.id, "%s", id);
    snprintf(d.tenant, sizeof d.tenant, "%s", tenant);
    snprintf(d.model, sizeof d.model, "%s", model);
    snprintf(d.firmware, sizeof d.firmware, "%s", fw);
    assert_int_equal(fm_store_device_add(f->st, &d, &err), 0);
}

static fm_record rec_at(const char *dev, const char *tenant, const char *mid, int64_t received)
{
    fm_record r = rec(mid, "{\"r\":1}");
    r.device_id = dev;
    r.tenant = tenant;
    r.received_ms = received;
    r.taken_ms = received - 7;
    return r;
}

static void expect_presence(fx *f, const char *dev, int online, int64_t changed, int64_t seen)
{
    fm_presence p;
    memset(&p, 0xff, sizeof p);
    assert_int_equal(fm_store_presence_get(f->st, dev, &p), 0);
    assert_int_equal(p.online, online);
    assert_int_equal(p.changed_ms, changed);
    assert_int_equal(p.last_seen_ms, seen);
}

static int presence1(fx *f, const char *id, int online, int64_t at)
{
    fm_presence_update u = {.device_id = id, .online = online, .at_ms = at};
    return fm_store_presence_set(f->st, "n1", &u, 1);
}

typedef struct pcounts {
    int n;
    char tenant[4][16];
    int64_t v[4][4];
} pcounts;

static int on_pcount(void *ud, const fm_presence_count *c)
{
    pcounts *p = ud;
    if (p->n < 4) {
        snprintf(p->tenant[p->n], sizeof p->tenant[0], "%s", c->tenant);
        p->v[p->n][0] = c->online;
        p->v[p->n][1] = c->offline;
        p->v[p->n][2] = c->inactive;
        p->v[p->n][3] = c->on_node;
    }
    p->n++;
    return 0;
}

static void test_presence(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    add_device(f, "dev-2", "t1", "", "");
    add_device(f, "dev-3", "t1", "", "");
    /* Never seen: zeros. Unknown devices are ignored, not an error. */
    expect_presence(f, "dev-1", 0, 0, 0);
    assert_int_equal(presence1(f, "ghost", 1, 100), 0);
    expect_presence(f, "ghost", 0, 0, 0);

    assert_int_equal(presence1(f, "dev-1", 1, 100), 0);
    expect_presence(f, "dev-1", 1, 100, 100);
    /* A measurement received later moves last_seen, not changed. */
    fm_record r = rec_at("dev-1", "t1", "p1", 1000);
    assert_int_equal(fm_store_commit(f->st, &r, 1, NULL, 0, &err), 0);
    expect_presence(f, "dev-1", 1, 100, 1000);
    /* A measurement without any presence row still counts as seen. */
    fm_record r2 = rec_at("dev-2", "t1", "p2", 700);
    assert_int_equal(fm_store_commit(f->st, &r2, 1, NULL, 0, &err), 0);
    expect_presence(f, "dev-2", 0, 0, 700);
    /* The disconnect is newer than the measurement. */
    assert_int_equal(presence1(f, "dev-1", 0, 2000), 0);
    expect_presence(f, "dev-1", 0, 2000, 2000);

    /* Reset: only devices online change, at the reset time. */
    assert_int_equal(presence1(f, "dev-1", 1, 3000), 0);
    assert_int_equal(presence1(f, "dev-2", 1, 3100), 0);
    assert_int_equal(presence1(f, "dev-3", 0, 50), 0);
    assert_int_equal(fm_store_presence_reset(f->st, "n1", 5000), 0);
    expect_presence(f, "dev-1", 0, 5000, 5000);
    expect_presence(f, "dev-2", 0, 5000, 5000);
    expect_presence(f, "dev-3", 0, 50, 50);
    /* Idempotent: nothing is online any more. */
    assert_int_equal(fm_store_presence_reset(f->st, "n1", 6000), 0);
    expect_presence(f, "dev-1", 0, 5000, 5000);

    /* A reset is one node's broker restarting: devices another node
     * reported since are left alone, and a device that moved back is
     * that node's again. */
    fm_presence_update on2 = {.device_id = "dev-2", .online = 1, .at_ms = 6100};
    assert_int_equal(fm_store_presence_set(f->st, "n2", &on2, 1), 0);
    assert_int_equal(presence1(f, "dev-3", 1, 6100), 0);
    assert_int_equal(fm_store_presence_reset(f->st, "n1", 6200), 0);
    expect_presence(f, "dev-2", 1, 6100, 6100);
    expect_presence(f, "dev-3", 0, 6200, 6200);
    assert_int_equal(fm_store_presence_reset(f->st, "n2", 6300), 0);
    expect_presence(f, "dev-2", 0, 6300, 6300);

    /* A batch in one call; a report older than the stored state (a late
     * duplicate from another node) does not undo it. */
    fm_presence_update batch[] = {
        {.device_id = "dev-1", .online = 1, .at_ms = 7000},
        {.device_id = "dev-2", .online = 1, .at_ms = 7000},
        {.device_id = "ghost", .online = 1, .at_ms = 7000},
        {.device_id = "dev-1", .online = 0, .at_ms = 6500},
    };
    assert_int_equal(fm_store_presence_set(f->st, "n1", batch, 4), 0);
    expect_presence(f, "dev-1", 1, 7000, 7000);
    expect_presence(f, "dev-2", 1, 7000, 7000);
    assert_int_equal(fm_store_presence_set(f->st, "n1", batch, 0), 0);

    /* Counts per tenant in one query: t1 has two devices online through
     * n1 and one offline; t2 one disabled device. */
    assert_int_equal(fm_store_tenant_ensure(f->st, "t2", &err), 0);
    add_device(f, "dev-9", "t2", "", "");
    assert_int_equal(fm_store_device_set_status(f->st, "dev-9", FM_DEVICE_DISABLED, &err), 0);
    pcounts c = {0};
    assert_int_equal(fm_store_presence_counts(f->st, "n1", on_pcount, &c), 0);
    assert_int_equal(c.n, 2);
    assert_string_equal(c.tenant[0], "t1");
    assert_int_equal(c.v[0][0], 2); /* online */
    assert_int_equal(c.v[0][1], 1); /* offline */
    assert_int_equal(c.v[0][2], 0); /* inactive */
    assert_int_equal(c.v[0][3], 2); /* through n1 */
    assert_string_equal(c.tenant[1], "t2");
    assert_int_equal(c.v[1][0] + c.v[1][1], 0);
    assert_int_equal(c.v[1][2], 1);
    memset(&c, 0, sizeof c);
    assert_int_equal(fm_store_presence_counts(f->st, "n2", on_pcount, &c), 0);
    assert_int_equal(c.v[0][3], 0);
}

/* Leases of cluster-wide jobs: one holder at a time, renewals, expiry by
 * the database's clock, release. */
static void test_leases(void **state)
{
    fx *f = *state;
    char owner[64] = "";
    assert_int_equal(fm_store_lease(f->st, "lake-export", "n1", 60000, owner, sizeof owner), 0);
    /* Renewed by its holder, refused to another (who learns the holder). */
    assert_int_equal(fm_store_lease(f->st, "lake-export", "n1", 60000, owner, sizeof owner), 0);
    assert_int_equal(fm_store_lease(f->st, "lake-export", "n2", 60000, owner, sizeof owner),
                     FM_EBUSY);
    assert_string_equal(owner, "n1");
    /* Leases are independent by name. */
    assert_int_equal(fm_store_lease(f->st, "retention", "n2", 60000, NULL, 0), 0);
    /* Released by its holder only; then anyone may take it. */
    assert_int_equal(fm_store_lease(f->st, "lake-export", "n2", 0, NULL, 0), 0);
    assert_int_equal(fm_store_lease(f->st, "lake-export", "n2", 60000, NULL, 0), FM_EBUSY);
    assert_int_equal(fm_store_lease(f->st, "lake-export", "n1", 0, NULL, 0), 0);
    assert_int_equal(fm_store_lease(f->st, "lake-export", "n2", 60000, NULL, 0), 0);
    /* An expired lease goes to the next taker. */
    assert_int_equal(fm_store_lease(f->st, "short", "n1", 1, NULL, 0), 0);
    uint64_t until = fm_mono_ns() + 5000000000ull;
    int rc;
    while ((rc = fm_store_lease(f->st, "short", "n2", 60000, NULL, 0)) == FM_EBUSY &&
           fm_mono_ns() < until)
        ;
    assert_int_equal(rc, 0);
    assert_int_equal(fm_store_lease(f->st, "short", "n1", 60000, owner, sizeof owner), FM_EBUSY);
    assert_string_equal(owner, "n2");
    assert_int_equal(fm_store_lease(f->st, "", "n1", 1000, NULL, 0), FM_EINVAL);
    assert_int_equal(fm_store_lease(f->st, "x", "", 1000, NULL, 0), FM_EINVAL);
}

static int count_audit(void *ud, const fm_audit *a)
{
    (void)a;
    ++*(int *)ud;
    return 0;
}

/* A claim is taken once, by anyone (its own holder included, as after a
 * restart), and its audit entry is written with it or not at all. */
static void test_claim_audit(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    fm_audit a = {.at_ms = 1796000000000, .tenant = "t1", .actor = "fleetml",
                  .action = "drift.alert", .target = "m@1", .outcome = "ok", .client = "",
                  .details_json = "{\"psi\":0.5}"};
    assert_int_equal(fm_store_claim_audit(f->st, "drift-alert:t1|m@1|1", "n1", 60000, &a, &err),
                     0);
    assert_true(a.seq > 0);
    int n = 0;
    assert_int_equal(fm_store_scan_audit(f->st, 0, 100, count_audit, &n), 0);
    a.seq = 0;
    assert_int_equal(fm_store_claim_audit(f->st, "drift-alert:t1|m@1|1", "n1", 60000, &a, &err),
                     FM_EBUSY);
    assert_int_equal(fm_store_claim_audit(f->st, "drift-alert:t1|m@1|1", "n2", 60000, &a, &err),
                     FM_EBUSY);
    int n2 = 0;
    assert_int_equal(fm_store_scan_audit(f->st, 0, 100, count_audit, &n2), 0);
    assert_int_equal(n2, n);
    /* Another day is another claim. */
    assert_int_equal(fm_store_claim_audit(f->st, "drift-alert:t1|m@1|2", "n2", 60000, &a, &err),
                     0);
    n2 = 0;
    assert_int_equal(fm_store_scan_audit(f->st, 0, 100, count_audit, &n2), 0);
    assert_int_equal(n2, n + 1);
    /* An expired claim may be made again. */
    assert_int_equal(fm_store_claim_audit(f->st, "short-claim", "n1", 1, &a, &err), 0);
    uint64_t until = fm_mono_ns() + 5000000000ull;
    int rc;
    while ((rc = fm_store_claim_audit(f->st, "short-claim", "n1", 60000, &a, &err)) == FM_EBUSY &&
           fm_mono_ns() < until)
        ;
    assert_int_equal(rc, 0);
    assert_int_equal(fm_store_claim_audit(f->st, "", "n1", 1000, &a, &err), FM_EINVAL);
    assert_int_equal(fm_store_claim_audit(f->st, "x", "n1", 0, &a, &err), FM_EINVAL);
}

/* A claim made while the same connection is still reading (the drift
 * check judges counts inside the read), after another connection has
 * committed: SQLite refuses the write (the read's snapshot is stale).
 * That must read as "try again", never as "someone else claimed it". */
typedef struct claim_in_read {
    fx *f;
    fm_store *other;
    int rc;
    int calls;
} claim_in_read;

static int claim_during_read(void *ud, const fm_drift_counts *c)
{
    (void)c;
    claim_in_read *k = ud;
    fm_errbuf err;
    k->calls++;
    assert_int_equal(fm_store_tenant_ensure(k->other, "t-meanwhile", &err), 0);
    fm_audit a = {.at_ms = 1796000000000, .tenant = "t1", .actor = "fleetml",
                  .action = "drift.alert", .target = "m@1", .outcome = "ok", .client = "",
                  .details_json = "{}"};
    k->rc = fm_store_claim_audit(k->f->st, "drift-alert:in-read", "n1", 60000, &a, &err);
    return 0;
}

static void test_claim_busy_is_not_claimed(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    fm_drift_counts c;
    memset(&c, 0, sizeof c);
    snprintf(c.tenant, sizeof c.tenant, "t1");
    snprintf(c.model, sizeof c.model, "m@1");
    c.day = 20000;
    c.n = 1;
    assert_int_equal(f->st->models->drift_add(f->st, &c, &err), 0);
    claim_in_read k = {.f = f};
    assert_int_equal(fm_store_open(&f->cfg, &k.other, &err), 0);
    assert_int_equal(f->st->models->drift_get(f->st, "t1", 20000, claim_during_read, &k), 0);
    fm_store_close(k.other);
    assert_int_equal(k.calls, 1);
    /* SQLite refuses it (this is the case that lost an alert); PostgreSQL
     * has read the rows before the callback runs and takes the claim. */
    if (strcmp(f->st->vt->name, "sqlite") == 0)
        assert_int_equal(k.rc, FM_EUNAVAIL);
    else
        assert_int_equal(k.rc, 0);
    /* Outside the read the claim is made (or was made inside it). */
    fm_audit a = {.at_ms = 1796000000000, .tenant = "t1", .actor = "fleetml",
                  .action = "drift.alert", .target = "m@1", .outcome = "ok", .client = "",
                  .details_json = "{}"};
    int rc = fm_store_claim_audit(f->st, "drift-alert:in-read", "n1", 60000, &a, &err);
    assert_int_equal(rc, k.rc == 0 ? FM_EBUSY : 0);
}

typedef struct dev_acc {
    char ids[16][65];
    char models[16][65];
    char firmware[16][65];
    int n, stop_after;
} dev_acc;

static int on_dev(void *ud, const fm_device *d)
{
    dev_acc *a = ud;
    assert_true(a->n < 16);
    snprintf(a->ids[a->n], sizeof a->ids[0], "%s", d->id);
    snprintf(a->models[a->n], sizeof a->models[0], "%s", d->model);
    snprintf(a->firmware[a->n], sizeof a->firmware[0], "%s", d->firmware);
    a->n++;
    return a->stop_after && a->n >= a->stop_after;
}

/* Pages through devices `limit` at a time; joins the ids with ','. */
static void page_all(fx *f, const char *tenant, size_t limit, char *out, size_t len)
{
    out[0] = '\0';
    char after[65] = "";
    for (int pages = 0;; pages++) {
        assert_true(pages < 20);
        dev_acc a = {0};
        assert_int_equal(fm_store_device_page(f->st, tenant, after, limit, on_dev, &a), 0);
        assert_true((size_t)a.n <= limit);
        for (int i = 0; i < a.n; i++) {
            size_t used = strlen(out);
            snprintf(out + used, len - used, "%s%s", used ? "," : "", a.ids[i]);
        }
        if ((size_t)a.n < limit)
            break;
        snprintf(after, sizeof after, "%s", a.ids[a.n - 1]);
    }
}

static void test_device_page(void **state)
{
    fx *f = *state;
    add_device(f, "c-1", "t1", "", "");
    add_device(f, "a-1", "t1", "", "");
    add_device(f, "d-2", "t2", "visc", "1.2.3");
    add_device(f, "b-2", "t2", "visc", "1.0.0");
    char ids[256];
    page_all(f, NULL, 2, ids, sizeof ids);
    assert_string_equal(ids, "a-1,b-2,c-1,d-2,dev-1");
    page_all(f, NULL, 1, ids, sizeof ids);
    assert_string_equal(ids, "a-1,b-2,c-1,d-2,dev-1");
    page_all(f, NULL, 100, ids, sizeof ids);
    assert_string_equal(ids, "a-1,b-2,c-1,d-2,dev-1");
    page_all(f, "t1", 2, ids, sizeof ids);
    assert_string_equal(ids, "a-1,c-1,dev-1");
    page_all(f, "t2", 1, ids, sizeof ids);
    assert_string_equal(ids, "b-2,d-2");
    page_all(f, "nobody", 5, ids, sizeof ids);
    assert_string_equal(ids, "");

    /* after_id NULL starts at the beginning; model and firmware are read;
     * a nonzero callback return stops the page. */
    dev_acc a = {0};
    assert_int_equal(fm_store_device_page(f->st, "t2", NULL, 10, on_dev, &a), 0);
    assert_int_equal(a.n, 2);
    assert_string_equal(a.models[1], "visc");
    assert_string_equal(a.firmware[1], "1.2.3");
    dev_acc b = {.stop_after = 1};
    assert_int_equal(fm_store_device_page(f->st, NULL, "a-1", 10, on_dev, &b), 0);
    assert_int_equal(b.n, 1);
    assert_string_equal(b.ids[0], "b-2");
}

typedef struct rec_acc {
    int64_t seq[64], ms[64];
    int n;
    int check_fields;
} rec_acc;

static int on_page_rec(void *ud, const fm_record *r)
{
    rec_acc *a = ud;
    assert_true(a->n < 64);
    a->seq[a->n] = r->seq;
    a->ms[a->n] = r->received_ms;
    a->n++;
    assert_string_equal(r->device_id, "dev-1");
    assert_string_equal(r->tenant, "t1");
    assert_int_equal(r->taken_ms, r->received_ms - 7);
    assert_int_equal(r->payload_len, 8);
    assert_memory_equal(r->payload, "{\"id\":1}", 8);
    assert_string_equal(r->result_json, "{\"r\":1}");
    assert_string_equal(r->model, "m@1");
    assert_non_null(r->measurement_id);
    return 0;
}

/* Collects every page of q (limit per page) via the cursor. */
static void page_measurements(fx *f, fm_measurement_query q, rec_acc *all)
{
    memset(all, 0, sizeof *all);
    for (int pages = 0;; pages++) {
        assert_true(pages < 64);
        rec_acc a = {0};
        assert_int_equal(fm_store_measurement_page(f->st, &q, on_page_rec, &a), 0);
        assert_true((size_t)a.n <= q.limit);
        for (int i = 0; i < a.n; i++) {
            all->seq[all->n] = a.seq[i];
            all->ms[all->n++] = a.ms[i];
        }
        if ((size_t)a.n < q.limit)
            break;
        q.cursor_ms = a.ms[a.n - 1];
        q.cursor_seq = a.seq[a.n - 1];
    }
}

static void test_measurement_page(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    add_device(f, "dev-2", "t2", "", "");
    /* Equal received_ms on purpose, and rows committed out of time order. */
    static const int64_t ms[10] = {200, 100, 200, 300, 200, 500, 300, 400, 500, 600};
    fm_record r[10];
    char mids[10][8];
    for (int i = 0; i < 10; i++) {
        snprintf(mids[i], sizeof mids[i], "m%d", i);
        r[i] = rec_at("dev-1", "t1", mids[i], ms[i]);
    }
    assert_int_equal(fm_store_commit(f->st, r, 10, NULL, 0, &err), 0);
    fm_record other = rec_at("dev-2", "t2", "m0", 450);
    assert_int_equal(fm_store_commit(f->st, &other, 1, NULL, 0, &err), 0);

    /* Expected: (received_ms DESC, seq DESC). */
    int order[10];
    for (int i = 0; i < 10; i++)
        order[i] = i;
    for (int i = 0; i < 10; i++)
        for (int j = i + 1; j < 10; j++) {
            int a = order[i], b = order[j];
            if (r[b].received_ms > r[a].received_ms ||
                (r[b].received_ms == r[a].received_ms && r[b].seq > r[a].seq)) {
                order[i] = b;
                order[j] = a;
            }
        }

    for (size_t limit = 1; limit <= 11; limit++) {
        rec_acc all;
        page_measurements(f, (fm_measurement_query){.device_id = "dev-1", .limit = limit}, &all);
        assert_int_equal(all.n, 10);
        for (int i = 0; i < 10; i++) {
            assert_int_equal(all.seq[i], r[order[i]].seq);
            assert_int_equal(all.ms[i], r[order[i]].received_ms);
        }
    }

    /* [from, to): 200 <= ms < 500, paged 2 at a time across the ties. */
    rec_acc win;
    page_measurements(f,
                      (fm_measurement_query){.device_id = "dev-1", .from_ms = 200, .to_ms = 500,
                                             .limit = 2},
                      &win);
    int k = 0;
    for (int i = 0; i < 10; i++) {
        const fm_record *x = &r[order[i]];
        if (x->received_ms < 200 || x->received_ms >= 500)
            continue;
        assert_true(k < win.n);
        assert_int_equal(win.seq[k], x->seq);
        k++;
    }
    assert_int_equal(win.n, k);
    assert_int_equal(k, 6);
    /* Only an upper or a lower bound. */
    rec_acc lo, hi;
    page_measurements(f, (fm_measurement_query){.device_id = "dev-1", .from_ms = 500, .limit = 3},
                      &lo);
    assert_int_equal(lo.n, 3);
    assert_int_equal(lo.ms[0], 600);
    assert_int_equal(lo.ms[2], 500);
    page_measurements(f, (fm_measurement_query){.device_id = "dev-1", .to_ms = 200, .limit = 3},
                      &hi);
    assert_int_equal(hi.n, 1);
    assert_int_equal(hi.ms[0], 100);

    /* A cursor in the middle of a tie continues within it. */
    int64_t tie[3], nt = 0;
    for (int i = 0; i < 10; i++)
        if (r[order[i]].received_ms == 200)
            tie[nt++] = r[order[i]].seq;
    assert_int_equal(nt, 3);
    rec_acc after_tie = {0};
    fm_measurement_query q = {.device_id = "dev-1", .cursor_ms = 200, .cursor_seq = tie[0],
                              .limit = 10};
    assert_int_equal(fm_store_measurement_page(f->st, &q, on_page_rec, &after_tie), 0);
    assert_int_equal(after_tie.n, 3);
    assert_int_equal(after_tie.seq[0], tie[1]);
    assert_int_equal(after_tie.seq[1], tie[2]);
    assert_int_equal(after_tie.ms[2], 100);

    /* Unknown device: an empty page. No device: invalid. */
    rec_acc none = {0};
    q = (fm_measurement_query){.device_id = "nope", .limit = 10};
    assert_int_equal(fm_store_measurement_page(f->st, &q, on_page_rec, &none), 0);
    assert_int_equal(none.n, 0);
    q.device_id = NULL;
    assert_int_equal(fm_store_measurement_page(f->st, &q, on_page_rec, &none), FM_EINVAL);
}

static int on_one_rec(void *ud, const fm_record *r)
{
    fm_record *out = ud;
    assert_int_equal(out->seq, 0); /* called once */
    out->seq = r->seq;
    out->received_ms = r->received_ms;
    assert_string_equal(r->measurement_id, "g1");
    assert_string_equal(r->result_json, "{\"r\":1}");
    assert_int_equal(r->payload_len, 8);
    return 0;
}

static void test_measurement_get(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    add_device(f, "dev-2", "t1", "", "");
    fm_record r = rec_at("dev-1", "t1", "g1", 4242);
    assert_int_equal(fm_store_commit(f->st, &r, 1, NULL, 0, &err), 0);
    fm_record got = {0};
    assert_int_equal(fm_store_measurement_get(f->st, "dev-1", "g1", on_one_rec, &got), 0);
    assert_int_equal(got.seq, r.seq);
    assert_int_equal(got.received_ms, 4242);
    fm_record none = {0};
    assert_int_equal(fm_store_measurement_get(f->st, "dev-1", "g2", on_one_rec, &none),
                     FM_ENOTFOUND);
    assert_int_equal(fm_store_measurement_get(f->st, "dev-2", "g1", on_one_rec, &none),
                     FM_ENOTFOUND);
    assert_int_equal(none.seq, 0);
}

static void expect_label(fx *f, const char *dev, const char *mid, int64_t seq,
                         const char *outputs, const char *source, const char *by, int64_t at)
{
    fm_label l;
    char src[64], who[64];
    assert_int_equal(fm_store_label_get(f->st, dev, mid, &l, src, sizeof src, who, sizeof who),
                     0);
    assert_int_equal(l.seq, seq);
    assert_string_equal(l.outputs_json, outputs);
    assert_string_equal(l.source, source);
    assert_string_equal(l.labelled_by, by);
    assert_int_equal(l.at_ms, at);
    assert_null(l.device_id);
    assert_null(l.tenant);
    assert_null(l.measurement_id);
    fm_free((void *)l.outputs_json);
}

typedef struct doc_acc {
    int64_t seq[32], at[32];
    char tenant[32][65];
    json_t *doc[32];
    int n, stop_after;
} doc_acc;

/* Rows of the LABELS and AUDIT streams as the store hands them over,
 * kept as JSON objects of their fields (outputs and details parsed). */
static int acc_row(doc_acc *a, int64_t seq, const char *tenant, int64_t at_ms, json_t *j)
{
    assert_true(a->n < 32);
    if (a->n > 0)
        assert_true(seq > a->seq[a->n - 1]);
    a->seq[a->n] = seq;
    a->at[a->n] = at_ms;
    snprintf(a->tenant[a->n], sizeof a->tenant[0], "%s", tenant);
    a->doc[a->n++] = j;
    return a->stop_after && a->n >= a->stop_after;
}

static json_t *parsed_object(const char *text)
{
    json_error_t e;
    json_t *j = json_loads(text, 0, &e);
    if (!json_is_object(j))
        fail_msg("stored text is not a JSON object: %s", text);
    return j;
}

static int on_label_row(void *ud, const fm_label *l)
{
    json_t *j = json_pack("{s:s,s:s,s:s,s:s,s:s,s:o}", "device_id", l->device_id, "tenant",
                          l->tenant, "measurement_id", l->measurement_id, "source", l->source,
                          "labelled_by", l->labelled_by, "outputs",
                          parsed_object(l->outputs_json));
    assert_non_null(j);
    return acc_row(ud, l->seq, l->tenant, l->at_ms, j);
}

static int on_audit_row(void *ud, const fm_audit *e)
{
    json_t *j = json_pack("{s:s,s:s,s:s,s:s,s:s,s:s,s:o}", "tenant", e->tenant, "actor",
                          e->actor, "action", e->action, "target", e->target, "outcome",
                          e->outcome, "client", e->client, "details",
                          parsed_object(e->details_json));
    assert_non_null(j);
    return acc_row(ud, e->seq, e->tenant, e->at_ms, j);
}

static void doc_acc_free(doc_acc *a)
{
    for (int i = 0; i < a->n; i++)
        json_decref(a->doc[i]);
    a->n = 0;
}

typedef struct changes_acc {
    int n;
    int64_t rev[16];
    char dev[16][16];
    char tenant[16][8];
    int online[16];
    int64_t changed[16];
} changes_acc;

static int on_change(void *ud, const fm_presence_change *c)
{
    changes_acc *a = ud;
    if (a->n < 16) {
        a->rev[a->n] = c->rev;
        snprintf(a->dev[a->n], sizeof a->dev[0], "%s", c->device_id);
        snprintf(a->tenant[a->n], sizeof a->tenant[0], "%s", c->tenant);
        a->online[a->n] = c->online;
        a->changed[a->n] = c->changed_ms;
    }
    a->n++;
    return 0;
}

/* Presence changes come back in commit order (rev), every one of them,
 * reset included; a reader passing the last rev it saw gets only what
 * changed since; the limit pages them. */
static void test_presence_changes(void **state)
{
    fx *f = *state;
    add_device(f, "dev-2", "t2", "", "");
    int64_t rev = -1;
    assert_int_equal(fm_store_presence_rev(f->st, &rev), 0);
    assert_int_equal(rev, 0);
    changes_acc a = {0};
    assert_int_equal(fm_store_presence_changes(f->st, 0, 10, on_change, &a), 0);
    assert_int_equal(a.n, 0);

    assert_int_equal(presence1(f, "dev-1", 1, 100), 0);
    assert_int_equal(presence1(f, "dev-2", 1, 110), 0);
    assert_int_equal(presence1(f, "ghost", 1, 120), 0); /* unknown: no change */
    assert_int_equal(fm_store_presence_changes(f->st, 0, 10, on_change, &a), 0);
    assert_int_equal(a.n, 2);
    assert_string_equal(a.dev[0], "dev-1");
    assert_string_equal(a.tenant[0], "t1");
    assert_string_equal(a.dev[1], "dev-2");
    assert_string_equal(a.tenant[1], "t2");
    assert_true(a.rev[0] > 0 && a.rev[1] > a.rev[0]);
    assert_int_equal(a.online[1], 1);
    assert_int_equal(a.changed[1], 110);
    int64_t seen = a.rev[1];
    assert_int_equal(fm_store_presence_rev(f->st, &rev), 0);
    assert_int_equal(rev, seen);

    /* dev-1 leaves and comes back: two changes, in order, however quick;
     * a late, older report is not a change. */
    assert_int_equal(presence1(f, "dev-1", 0, 200), 0);
    assert_int_equal(presence1(f, "dev-1", 1, 300), 0);
    assert_int_equal(presence1(f, "dev-1", 0, 250), 0);
    memset(&a, 0, sizeof a);
    assert_int_equal(fm_store_presence_changes(f->st, seen, 10, on_change, &a), 0);
    assert_int_equal(a.n, 2);
    assert_string_equal(a.dev[0], "dev-1");
    assert_int_equal(a.online[0], 0);
    assert_int_equal(a.changed[0], 200);
    assert_int_equal(a.online[1], 1);
    assert_int_equal(a.changed[1], 300);
    assert_true(a.rev[1] > a.rev[0]);
    seen = a.rev[1];

    /* The broker restarts: both go offline, each with a rev of its own,
     * after every earlier one. */
    assert_int_equal(fm_store_presence_reset(f->st, "n1", 1000), 0);
    memset(&a, 0, sizeof a);
    assert_int_equal(fm_store_presence_changes(f->st, seen, 10, on_change, &a), 0);
    assert_int_equal(a.n, 2);
    assert_true(a.rev[0] > seen && a.rev[1] > a.rev[0]);
    assert_int_equal(a.online[0], 0);
    assert_int_equal(a.online[1], 0);
    assert_int_equal(a.changed[0], 1000);
    /* Paged: one at a time. */
    memset(&a, 0, sizeof a);
    assert_int_equal(fm_store_presence_changes(f->st, seen, 1, on_change, &a), 0);
    assert_int_equal(a.n, 1);
    int64_t first = a.rev[0];
    memset(&a, 0, sizeof a);
    assert_int_equal(fm_store_presence_changes(f->st, first, 1, on_change, &a), 0);
    assert_int_equal(a.n, 1);
    assert_true(a.rev[0] > first);
}

/* The device list shows when a device's certificate ends: the latest
 * not-after of its active (or grace) certificates, none once revoked. */
static void test_presence_cert_expiry(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    fm_presence p;
    assert_int_equal(fm_store_presence_get(f->st, "dev-1", &p), 0);
    assert_int_equal(p.cert_expires_ms, 0);
    assert_int_equal(fm_store_cert_add(f->st, "dev-1", "0a", "", 5000, &err), 0);
    assert_int_equal(fm_store_cert_add(f->st, "dev-1", "0b", "", 9000, &err), 0);
    assert_int_equal(fm_store_presence_get(f->st, "dev-1", &p), 0);
    assert_int_equal(p.cert_expires_ms, 9000);
    /* Registered with its first certificate's expiry (direct issue). */
    fm_device d = {.status = FM_DEVICE_ACTIVE, .cert_not_after_ms = 7777};
    snprintf(d.id, sizeof d.id, "dev-9");
    snprintf(d.tenant, sizeof d.tenant, "t1");
    snprintf(d.cert_serial, sizeof d.cert_serial, "0c");
    assert_int_equal(fm_store_device_add(f->st, &d, &err), 0);
    assert_int_equal(fm_store_presence_get(f->st, "dev-9", &p), 0);
    assert_int_equal(p.cert_expires_ms, 7777);
    assert_int_equal(fm_store_device_revoke(f->st, "dev-1", &err), 0);
    assert_int_equal(fm_store_presence_get(f->st, "dev-1", &p), 0);
    assert_int_equal(p.cert_expires_ms, 0);
}

static const char *jget(json_t *o, const char *k)
{
    return json_string_value(json_object_get(o, k));
}

static void test_labels(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    add_device(f, "dev-2", "t2", "", "");
    fm_record r = rec_at("dev-1", "t1", "m1", 1000);
    assert_int_equal(fm_store_commit(f->st, &r, 1, NULL, 0, &err), 0);
    fm_record r2 = rec_at("dev-2", "t2", "m1", 1000);
    assert_int_equal(fm_store_commit(f->st, &r2, 1, NULL, 0, &err), 0);

    fm_label l = {.device_id = "dev-1", .tenant = "t1", .measurement_id = "m1",
                  .outputs_json = "{\"viscosity\":1.25}", .source = "lab:capillary",
                  .labelled_by = "alice", .at_ms = 5000};
    assert_int_equal(fm_store_label_put(f->st, &l, &err), 0);
    int64_t first = l.seq;
    assert_true(first > 0);
    expect_label(f, "dev-1", "m1", first, "{\"viscosity\":1.25}", "lab:capillary", "alice", 5000);

    /* A correction replaces it with a new, larger seq. */
    fm_label l2 = {.device_id = "dev-1", .tenant = "t1", .measurement_id = "m1",
                   .outputs_json = "{\"viscosity\":1.5}", .source = "lab:rotational",
                   .labelled_by = "bob", .at_ms = 6000};
    assert_int_equal(fm_store_label_put(f->st, &l2, &err), 0);
    assert_true(l2.seq > first);
    expect_label(f, "dev-1", "m1", l2.seq, "{\"viscosity\":1.5}", "lab:rotational", "bob", 6000);
    int64_t max = 0;
    assert_int_equal(fm_store_max_seq(f->st, FM_STREAM_LABELS, &max), 0);
    assert_int_equal(max, l2.seq);

    /* No such measurement, or one of another tenant: nothing is stored. */
    fm_label bad = l2;
    bad.measurement_id = "nope";
    assert_int_equal(fm_store_label_put(f->st, &bad, &err), FM_ENOTFOUND);
    assert_int_equal(bad.seq, 0);
    assert_non_null(strstr(err.msg, "nope"));
    bad = l2;
    bad.device_id = "dev-2"; /* its m1 belongs to t2 */
    assert_int_equal(fm_store_label_put(f->st, &bad, &err), FM_ENOTFOUND);
    bad = l2;
    bad.outputs_json = "[1]";
    assert_int_equal(fm_store_label_put(f->st, &bad, &err), FM_EINVAL);
    bad.outputs_json = "{oops";
    assert_int_equal(fm_store_label_put(f->st, &bad, &err), FM_EINVAL);
    fm_label out;
    char src[8], who[8];
    assert_int_equal(fm_store_label_get(f->st, "dev-1", "nope", &out, src, sizeof src, who,
                                        sizeof who),
                     FM_ENOTFOUND);
    assert_int_equal(fm_store_label_get(f->st, "dev-2", "m1", &out, src, sizeof src, who,
                                        sizeof who),
                     FM_ENOTFOUND);
    assert_int_equal(fm_store_max_seq(f->st, FM_STREAM_LABELS, &max), 0);
    assert_int_equal(max, l2.seq);

    /* Without a tenant the measurement's is stored; small buffers truncate. */
    fm_label l3 = {.device_id = "dev-2", .measurement_id = "m1", .outputs_json = "{}",
                   .source = "a-long-source-name", .labelled_by = "carol"};
    assert_int_equal(fm_store_label_put(f->st, &l3, &err), 0);
    assert_true(l3.at_ms > 0); /* 0 meant now */
    assert_int_equal(fm_store_label_get(f->st, "dev-2", "m1", &out, src, sizeof src, who,
                                        sizeof who),
                     0);
    assert_string_equal(out.source, "a-long-");
    fm_free((void *)out.outputs_json);
    assert_int_equal(fm_store_label_get(f->st, "dev-2", "m1", &out, NULL, 0, NULL, 0), 0);
    assert_null(out.source);
    assert_null(out.labelled_by);
    fm_free((void *)out.outputs_json);

    /* The lake stream has every version, the corrected one too, in order;
     * label_get reads the current one. */
    doc_acc a = {0};
    assert_int_equal(fm_store_scan_labels(f->st, 0, 10, on_label_row, &a), 0);
    assert_int_equal(a.n, 3);
    assert_int_equal(a.seq[0], first);
    assert_int_equal(a.seq[1], l2.seq);
    assert_int_equal(a.seq[2], l3.seq);
    assert_string_equal(jget(a.doc[0], "labelled_by"), "alice");
    assert_string_equal(jget(a.doc[1], "labelled_by"), "bob");
    assert_string_equal(a.tenant[2], "t2");
    assert_string_equal(jget(a.doc[2], "tenant"), "t2");
    doc_acc_free(&a);

    /* A measurement's history: its labels only, oldest first, with the
     * values each had; none for one never labelled. */
    doc_acc hist = {0};
    assert_int_equal(fm_store_label_history(f->st, "dev-1", "m1", on_label_row, &hist), 0);
    assert_int_equal(hist.n, 2);
    assert_int_equal(hist.seq[0], first);
    assert_int_equal(hist.seq[1], l2.seq);
    assert_string_equal(jget(hist.doc[0], "source"), "lab:capillary");
    assert_int_equal(hist.at[0], 5000);
    assert_true(json_real_value(json_object_get(json_object_get(hist.doc[1], "outputs"),
                                                "viscosity")) == 1.5);
    doc_acc_free(&hist);
    doc_acc none = {0};
    assert_int_equal(fm_store_label_history(f->st, "dev-1", "nope", on_label_row, &none), 0);
    assert_int_equal(none.n, 0);
}

typedef struct audit_acc {
    int64_t seq[16];
    int n;
} audit_acc;

static int on_audit(void *ud, const fm_audit *e)
{
    audit_acc *a = ud;
    assert_true(a->n < 16);
    json_t *d = json_loads(e->details_json, 0, NULL);
    assert_true(json_is_object(d));
    json_decref(d);
    if (strcmp(e->action, "x") == 0) { /* appended with NULL strings */
        assert_string_equal(e->tenant, "");
        assert_string_equal(e->target, "");
        assert_string_equal(e->outcome, "");
        assert_string_equal(e->client, "");
        assert_string_equal(e->details_json, "{}");
    } else {
        assert_string_equal(e->target, "device:dev-1");
        assert_string_equal(e->outcome, "ok");
        assert_string_equal(e->client, "127.0.0.1");
        assert_true(e->at_ms >= 1000 && e->at_ms <= 7000);
    }
    a->seq[a->n++] = e->seq;
    return 0;
}

static void test_audit(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    struct {
        const char *tenant, *actor, *action;
        int64_t at;
    } in[7] = {
        {"t1", "user:t1/alice", "auth.login", 1000},
        {"t2", "user:t2/bob", "auth.login", 2000},
        {"t1", "user:t1/alice", "device.revoke", 3000},
        {"", "anonymous", "auth.login", 4000},
        {"t1", "cli", "device.revoke", 5000},
        {"t1", "user:t1/alice", "measurement.read", 6000},
        {"t2", "user:t2/bob", "device.revoke", 7000},
    };
    int64_t seq[7];
    for (int i = 0; i < 7; i++) {
        fm_audit a = {.at_ms = in[i].at, .tenant = in[i].tenant, .actor = in[i].actor,
                      .action = in[i].action, .target = "device:dev-1", .outcome = "ok",
                      .client = "127.0.0.1", .details_json = i == 0 ? NULL : "{\"i\":1}"};
        assert_int_equal(fm_store_audit_append(f->st, &a, &err), 0);
        seq[i] = a.seq;
        assert_true(i == 0 || seq[i] > seq[i - 1]);
    }
    fm_audit bad = {.actor = "cli", .details_json = "not json"};
    assert_int_equal(fm_store_audit_append(f->st, &bad, &err), FM_EINVAL);
    assert_int_equal(bad.seq, 0);
    fm_audit now = {.actor = "cli", .action = "x"}; /* NULLs stored as "" */
    assert_int_equal(fm_store_audit_append(f->st, &now, &err), 0);
    assert_true(now.at_ms > 7000);
    int64_t max = 0;
    assert_int_equal(fm_store_max_seq(f->st, FM_STREAM_AUDIT, &max), 0);
    assert_int_equal(max, now.seq);

    /* Each case pages through the filter `limit` entries at a time; want
     * lists the entries as indices into in[] (7: the `now` entry). */
    struct {
        fm_audit_filter f;
        size_t limit;
        const char *want;
    } cases[] = {
        {{0}, 3, "7,6,5,4,3,2,1,0"},
        {{.tenant = "t1"}, 2, "5,4,2,0"},
        {{.tenant = ""}, 2, "7,3"},
        {{.actor = "user:t2/bob"}, 1, "6,1"},
        {{.action = "device.revoke"}, 10, "6,4,2"},
        {{.tenant = "t1", .action = "device.revoke"}, 1, "4,2"},
        {{.from_ms = 2000, .to_ms = 5000}, 2, "3,2,1"},
        {{.from_ms = 6000}, 10, "7,6,5"},
        {{.to_ms = 2001}, 10, "1,0"},
        {{.tenant = "nobody"}, 10, ""},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        char got[64] = "";
        fm_audit_filter flt = cases[c].f;
        for (int pages = 0; pages < 20; pages++) {
            audit_acc a = {0};
            assert_int_equal(fm_store_audit_page(f->st, &flt, cases[c].limit, on_audit, &a), 0);
            for (int i = 0; i < a.n; i++) {
                int idx = 7;
                for (int j = 0; j < 7; j++)
                    if (seq[j] == a.seq[i])
                        idx = j;
                size_t used = strlen(got);
                snprintf(got + used, sizeof got - used, "%s%d", used ? "," : "", idx);
            }
            if ((size_t)a.n < cases[c].limit)
                break;
            flt.before_seq = a.seq[a.n - 1];
        }
        if (strcmp(got, cases[c].want) != 0)
            fail_msg("audit case %zu: got \"%s\", want \"%s\"", c, got, cases[c].want);
    }
    /* NULL filter: everything, newest first. */
    audit_acc all = {0};
    assert_int_equal(fm_store_audit_page(f->st, NULL, 100, on_audit, &all), 0);
    assert_int_equal(all.n, 8);
    assert_int_equal(all.seq[0], now.seq);
}

static void test_scan_labels_audit(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    fm_record r[3] = {rec_at("dev-1", "t1", "a", 1000), rec_at("dev-1", "t1", "b", 1000),
                      rec_at("dev-1", "t1", "c", 1000)};
    assert_int_equal(fm_store_commit(f->st, r, 3, NULL, 0, &err), 0);
    const char *mids[3] = {"a", "b", "c"};
    for (int i = 0; i < 3; i++) {
        fm_label l = {.device_id = "dev-1", .tenant = "t1", .measurement_id = mids[i],
                      .outputs_json = "{\"viscosity\": 2.5,\n \"density\": 998}",
                      .source = "lab \"quoted\"\nline", .labelled_by = "alice",
                      .at_ms = 1795737599999LL + i};
        assert_int_equal(fm_store_label_put(f->st, &l, &err), 0);
    }
    doc_acc a = {0};
    assert_int_equal(fm_store_scan_labels(f->st, 0, 10, on_label_row, &a), 0);
    assert_int_equal(a.n, 3);
    json_t *d = a.doc[0];
    assert_string_equal(jget(d, "device_id"), "dev-1");
    assert_string_equal(jget(d, "tenant"), "t1");
    assert_string_equal(jget(d, "measurement_id"), "a");
    assert_string_equal(jget(d, "source"), "lab \"quoted\"\nline");
    assert_string_equal(jget(d, "labelled_by"), "alice");
    assert_int_equal(a.at[1], 1795737600000LL);
    json_t *o = json_object_get(d, "outputs");
    assert_true(json_is_object(o));
    assert_true(json_real_value(json_object_get(o, "viscosity")) == 2.5);
    assert_int_equal(json_integer_value(json_object_get(o, "density")), 998);
    assert_int_equal(a.at[0], 1795737599999LL);
    assert_string_equal(a.tenant[0], "t1");
    int64_t s1 = a.seq[0], s2 = a.seq[1];
    doc_acc_free(&a);
    /* after and limit */
    assert_int_equal(fm_store_scan_labels(f->st, s1, 1, on_label_row, &a), 0);
    assert_int_equal(a.n, 1);
    assert_int_equal(a.seq[0], s2);
    doc_acc_free(&a);
    a.stop_after = 2;
    assert_int_equal(fm_store_scan_labels(f->st, 0, 10, on_label_row, &a), 0);
    assert_int_equal(a.n, 2);
    doc_acc_free(&a);
    a.stop_after = 0;

    fm_audit e1 = {.at_ms = 1000, .tenant = "t1", .actor = "user:t1/alice",
                   .action = "label.put", .target = "measurement:dev-1/a", .outcome = "ok",
                   .client = "10.0.0.1", .details_json = "{\"n\": [1, 2]}"};
    fm_audit e2 = {.at_ms = 2000, .tenant = "", .actor = "anonymous", .action = "auth.login",
                   .target = "", .outcome = "denied", .client = ""};
    assert_int_equal(fm_store_audit_append(f->st, &e1, &err), 0);
    assert_int_equal(fm_store_audit_append(f->st, &e2, &err), 0);
    assert_int_equal(fm_store_scan_audit(f->st, 0, 10, on_audit_row, &a), 0);
    assert_int_equal(a.n, 2);
    d = a.doc[0];
    assert_int_equal(a.seq[0], e1.seq);
    assert_int_equal(a.at[0], 1000);
    assert_string_equal(jget(d, "tenant"), "t1");
    assert_string_equal(jget(d, "actor"), "user:t1/alice");
    assert_string_equal(jget(d, "action"), "label.put");
    assert_string_equal(jget(d, "target"), "measurement:dev-1/a");
    assert_string_equal(jget(d, "outcome"), "ok");
    assert_string_equal(jget(d, "client"), "10.0.0.1");
    assert_int_equal(json_array_size(json_object_get(json_object_get(d, "details"), "n")), 2);
    assert_true(json_is_object(json_object_get(a.doc[1], "details")));
    assert_int_equal(json_object_size(json_object_get(a.doc[1], "details")), 0);
    assert_string_equal(a.tenant[1], "");
    assert_int_equal(a.at[1], 2000);
    doc_acc_free(&a);
    assert_int_equal(fm_store_scan_audit(f->st, e2.seq, 10, on_audit_row, &a), 0);
    assert_int_equal(a.n, 0);
}

/* A database at the previous schema version (users and sessions) gets the
 * API tables on open, keeping its data. */
static void test_migrate_api_tables(void **state)
{
    fx *f = *state;
    if (test_store_is_pg())
        skip(); /* SQLite's own migration path */
    fm_errbuf err;
    fm_record r = rec("old", "{}");
    assert_int_equal(fm_store_commit(f->st, &r, 1, NULL, 0, &err), 0);
    fm_store_close(f->st);
    f->st = NULL;
    char path[128];
    snprintf(path, sizeof path, "%s/db/fleetml.db", f->dir);
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db,
                                  "DROP TABLE device_presence; DROP TABLE labels; DROP TABLE label_log;"
                                  " DROP TABLE audit; DROP INDEX devices_by_tenant; DROP TABLE user_totp;"
                                  " ALTER TABLE refresh_families DROP COLUMN mfa;"
                                  " DROP INDEX certs_by_key; ALTER TABLE certs DROP COLUMN key_id;"
                                  " DROP TABLE model_versions; DROP TABLE model_aliases;"
                                  " DROP TABLE model_alias_log; ALTER TABLE measurements DROP COLUMN shadow;"
                                  " DROP TABLE drift_counts; DROP TABLE training_jobs;"
                                  " DROP TABLE leases; DROP TABLE presence_log;"
                                  " DROP TABLE rules; DROP TABLE rule_log; DROP TABLE lake_object_log;"
                                  " PRAGMA user_version = 4;",
                                  NULL, NULL, NULL),
                     SQLITE_OK);
    sqlite3_close(db);
    assert_int_equal(fm_store_open(&f->cfg, &f->st, &err), 0);
    fm_label l = {.device_id = "dev-1", .measurement_id = "old", .outputs_json = "{}"};
    assert_int_equal(fm_store_label_put(f->st, &l, &err), 0);
    fm_audit a = {.actor = "cli", .action = "migrate"};
    assert_int_equal(fm_store_audit_append(f->st, &a, &err), 0);
    assert_int_equal(presence1(f, "dev-1", 1, 10), 0);
    expect_presence(f, "dev-1", 1, 10, 1000);
    assert_int_equal(fm_store_lease(f->st, "lake-export", "n1", 1000, NULL, 0), 0);
    int64_t rev = 0;
    assert_int_equal(fm_store_presence_rev(f->st, &rev), 0);
    assert_true(rev > 0);
    fm_rule_row rule = {.tenant = "t1", .name = "r", .spec_json = "{}"};
    assert_int_equal(fm_store_rule_put(f->st, &rule, NULL, &err), 0);
    fm_lake_cursor c = {.last_seq = 1};
    fm_lake_object o = {.tenant = "t1", .area = "raw", .key = "raw/k", .rows = 1};
    assert_int_equal(fm_store_lake_settle(f->st, "n1", FM_STREAM_RAW, &c, &o, 1, &err), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_catalogue, setup, teardown),
        cmocka_unit_test_setup_teardown(test_commit_and_lookup, setup, teardown),
        cmocka_unit_test_setup_teardown(test_commit_skips_stored_keys, setup, teardown),
        cmocka_unit_test_setup_teardown(test_scan_and_cursor, setup, teardown),
        cmocka_unit_test_setup_teardown(test_claim_audit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_claim_busy_is_not_claimed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reopen, setup, teardown),
        cmocka_unit_test_setup_teardown(test_probe_write, setup, teardown),
        cmocka_unit_test(test_unknown_backend),
        cmocka_unit_test_setup_teardown(test_leases, setup, teardown),
        cmocka_unit_test_setup_teardown(test_presence, setup, teardown),
        cmocka_unit_test_setup_teardown(test_presence_changes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_presence_cert_expiry, setup, teardown),
        cmocka_unit_test_setup_teardown(test_device_page, setup, teardown),
        cmocka_unit_test_setup_teardown(test_measurement_page, setup, teardown),
        cmocka_unit_test_setup_teardown(test_measurement_get, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hot_path_checkpoints_beside_commits, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hot_path_log_is_bounded, setup, teardown),
        cmocka_unit_test_setup_teardown(test_labels, setup, teardown),
        cmocka_unit_test_setup_teardown(test_audit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_scan_labels_audit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_migrate_api_tables, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
