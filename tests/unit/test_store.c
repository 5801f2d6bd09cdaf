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

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

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
    fm_errbuf err;
    assert_int_equal(fm_store_open(&f->cfg, &f->st, &err), 0);
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

/* A batch holding one id that is already stored fails as a whole: nothing
 * of it is half-stored. */
static void test_commit_is_atomic(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    fm_record first = rec("x", "{}");
    assert_int_equal(fm_store_commit(f->st, &first, 1, NULL, 0, &err), 0);
    fm_record batch[3] = {rec("y", "{}"), rec("z", "{}"), rec("x", "{}")};
    assert_int_equal(fm_store_commit(f->st, batch, 3, NULL, 0, &err), FM_EEXIST);
    assert_int_equal(batch[0].seq, 0);
    long n;
    assert_int_equal(fm_store_count_measurements(f->st, "dev-1", &n), 0);
    assert_int_equal(n, 1);
    char *res = NULL;
    assert_int_equal(fm_store_result_lookup(f->st, "dev-1", "y", &res), FM_ENOTFOUND);
    /* the handle is usable again after the failed transaction */
    fm_record again[2] = {rec("y", "{}"), rec("z", "{}")};
    assert_int_equal(fm_store_commit(f->st, again, 2, NULL, 0, &err), 0);
    assert_int_equal(fm_store_count_measurements(f->st, "dev-1", &n), 0);
    assert_int_equal(n, 3);
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_catalogue, setup, teardown),
        cmocka_unit_test_setup_teardown(test_commit_and_lookup, setup, teardown),
        cmocka_unit_test_setup_teardown(test_commit_is_atomic, setup, teardown),
        cmocka_unit_test_setup_teardown(test_scan_and_cursor, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reopen, setup, teardown),
        cmocka_unit_test_setup_teardown(test_probe_write, setup, teardown),
        cmocka_unit_test(test_unknown_backend),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
