/*
 * Unit tests for the device SDK parts that need no broker: correlation
 * tracking, result matching, reconnect backoff, the latency histogram, and
 * the command-line validation of `device run` / `sim` (black-box, through
 * the built binary, when it exists).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "fleetml/device.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <limits.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---- a client that never connects ------------------------------------------ */

struct seen {
    int calls;
    char id[80];
    char status[16];
    char json[512];
    fm_devclient *c;
    fm_devclient_result_info info;
    int info_rc;
    int republish_rc; /* result of publishing from inside the callback */
    bool republish;
};

static void on_result(void *ud, const char *mid, const char *status, const char *json, size_t len)
{
    struct seen *s = ud;
    s->calls++;
    snprintf(s->id, sizeof s->id, "%s", mid);
    snprintf(s->status, sizeof s->status, "%s", status);
    snprintf(s->json, sizeof s->json, "%.*s", (int)len, json ? json : "");
    s->info_rc = fm_devclient_result_info_get(s->c, &s->info);
    if (s->republish)
        s->republish_rc = fm_devclient_publish_measurement(s->c, "{}", 2, "again-1");
}

static fm_devclient *make_client(struct seen *s, int max_pending, int timeout_ms, int attempts)
{
    fm_devclient_opts o = {
        .id = "dev-test",
        .ca_path = "/nonexistent/ca.crt",
        .cert_path = "/nonexistent/device.crt",
        .key_path = "/nonexistent/device.key",
        .on_result = on_result,
        .ud = s,
        .max_pending = max_pending,
        .result_timeout_ms = timeout_ms,
        .max_attempts = attempts,
    };
    fm_devclient *c = NULL;
    fm_errbuf err;
    assert_int_equal(fm_devclient_new(&o, &c, &err), 0);
    s->c = c;
    return c;
}

static void test_new_validates(void **state)
{
    (void)state;
    fm_devclient_opts o = {.id = "Bad_Id", .ca_path = "a", .cert_path = "b", .key_path = "c",
                           .on_result = on_result};
    fm_devclient *c = NULL;
    fm_errbuf err;
    assert_int_equal(fm_devclient_new(&o, &c, &err), FM_EINVAL);
    assert_null(c);
    assert_non_null(strstr(err.msg, "device id"));
    o.id = "dev-ok";
    o.on_result = NULL;
    assert_int_equal(fm_devclient_new(&o, &c, &err), FM_EINVAL);
    o.on_result = on_result;
    o.key_path = NULL;
    assert_int_equal(fm_devclient_new(&o, &c, &err), FM_EINVAL);
    o.key_path = "c";
    o.max_pending = FM_DEVCLIENT_MAX_PENDING_LIMIT + 1;
    assert_int_equal(fm_devclient_new(&o, &c, &err), FM_EINVAL);
}

static void test_connect_missing_files(void **state)
{
    (void)state;
    struct seen s = {0};
    fm_devclient *c = make_client(&s, 0, 0, 0);
    fm_errbuf err;
    assert_int_equal(fm_devclient_connect(c, &err), FM_ECRYPTO);
    assert_non_null(strstr(err.msg, "/nonexistent/ca.crt"));
    assert_false(fm_devclient_ready(c));
    assert_int_equal(fm_devclient_fd(c), -1);
    fm_devclient_free(c);
}

static void test_measurement_id_valid(void **state)
{
    (void)state;
    assert_true(fm_device_measurement_id_valid("m-000001"));
    assert_true(fm_device_measurement_id_valid("A.b_c:d-9"));
    assert_false(fm_device_measurement_id_valid(""));
    assert_false(fm_device_measurement_id_valid("has space"));
    assert_false(fm_device_measurement_id_valid("slash/no"));
    char longid[FM_DEVICE_MEAS_ID_MAXLEN + 2];
    memset(longid, 'a', sizeof longid - 1);
    longid[sizeof longid - 1] = '\0';
    assert_false(fm_device_measurement_id_valid(longid));
    longid[FM_DEVICE_MEAS_ID_MAXLEN] = '\0';
    assert_true(fm_device_measurement_id_valid(longid));
}

static void test_publish_queue_limits(void **state)
{
    (void)state;
    struct seen s = {0};
    fm_devclient *c = make_client(&s, 2, 0, 0);
    assert_int_equal(fm_devclient_publish_measurement(c, "{}", 2, "m-1"), 0);
    assert_int_equal(fm_devclient_publish_measurement(c, "{}", 2, "m-1"), FM_EEXIST);
    assert_int_equal(fm_devclient_publish_measurement(c, "{}", 0, "m-2"), FM_EINVAL);
    assert_int_equal(fm_devclient_publish_measurement(c, "{}", 2, "bad id"), FM_EINVAL);
    assert_int_equal(fm_devclient_publish_measurement(c, "{}", 2, "m-2"), 0);
    assert_int_equal(fm_devclient_publish_measurement(c, "{}", 2, "m-3"), FM_EBUSY);
    assert_int_equal(fm_devclient_pending(c), 2);
    assert_int_equal(s.calls, 0); /* publishing never reports synchronously */
    fm_devclient_free(c); /* drops pending without callbacks */
    assert_int_equal(s.calls, 0);
}

static void test_result_matching(void **state)
{
    (void)state;
    struct seen s = {0};
    fm_devclient *c = make_client(&s, 4, 0, 0);
    assert_int_equal(fm_devclient_publish_measurement(c, "{\"x\":1}", 7, "m-1"), 0);
    assert_int_equal(fm_devclient_publish_measurement(c, "{\"x\":2}", 7, "m-2"), 0);

    uint8_t c1[FM_DEVCLIENT_CORR_LEN], c2[FM_DEVCLIENT_CORR_LEN], small[4];
    size_t n1 = 0, n2 = 0, ns = 0;
    assert_int_equal(fm_devclient_correlation(c, "m-1", c1, sizeof c1, &n1), 0);
    assert_int_equal(fm_devclient_correlation(c, "m-2", c2, sizeof c2, &n2), 0);
    assert_int_equal(fm_devclient_correlation(c, "m-2", small, sizeof small, &ns), FM_ERANGE);
    assert_int_equal(fm_devclient_correlation(c, "m-9", c2, sizeof c2, &n2), FM_ENOTFOUND);
    assert_int_equal(n1, FM_DEVCLIENT_CORR_LEN);
    assert_memory_not_equal(c1, c2, FM_DEVCLIENT_CORR_LEN);

    /* Unknown correlation data is ignored. */
    uint8_t junk[FM_DEVCLIENT_CORR_LEN] = {0};
    const char *ok2 = "{\"id\":\"m-2\",\"status\":\"ok\",\"outputs\":{\"v\":1}}";
    assert_int_equal(fm_devclient_handle_result(c, junk, sizeof junk, ok2, strlen(ok2)), 0);
    assert_int_equal(fm_devclient_handle_result(c, c2, 3, ok2, strlen(ok2)), 0);
    assert_int_equal(s.calls, 0);

    /* A result whose id disagrees with the correlation is not trusted. */
    assert_int_equal(fm_devclient_handle_result(c, c1, n1, ok2, strlen(ok2)), 0);
    assert_int_equal(s.calls, 0);
    /* Neither is garbage. */
    assert_int_equal(fm_devclient_handle_result(c, c1, n1, "{nope", 5), 0);
    assert_int_equal(s.calls, 0);

    /* The matching result resolves exactly that measurement. */
    assert_int_equal(fm_devclient_handle_result(c, c2, n2, ok2, strlen(ok2)), 0);
    assert_int_equal(s.calls, 1);
    assert_string_equal(s.id, "m-2");
    assert_string_equal(s.status, "ok");
    assert_string_equal(s.json, ok2);
    assert_int_equal(s.info_rc, 0);
    assert_int_equal(s.info.attempts, 0); /* never sent: no broker */
    assert_int_equal(fm_devclient_pending(c), 1);
    assert_int_equal(fm_devclient_result_info_get(c, &s.info), FM_ESTATE);

    /* A duplicate (e.g. the answer to a retry) is ignored. */
    assert_int_equal(fm_devclient_handle_result(c, c2, n2, ok2, strlen(ok2)), 0);
    assert_int_equal(s.calls, 1);

    /* The freed slot is reused with a new generation: the old correlation
     * data must not resolve the new measurement. */
    s.republish = true;
    const char *err1 = "{\"id\":\"m-1\",\"status\":\"error\",\"error\":{\"code\":\"invalid_value\","
                       "\"message\":\"x\"}}";
    assert_int_equal(fm_devclient_handle_result(c, c1, n1, err1, strlen(err1)), 0);
    assert_int_equal(s.calls, 2);
    assert_string_equal(s.status, "error");
    assert_int_equal(s.republish_rc, 0); /* publishing from the callback works */
    s.republish = false;
    uint8_t c3[FM_DEVCLIENT_CORR_LEN];
    size_t n3 = 0;
    assert_int_equal(fm_devclient_correlation(c, "again-1", c3, sizeof c3, &n3), 0);
    const char *ok3 = "{\"id\":\"again-1\",\"status\":\"ok\"}";
    assert_int_equal(fm_devclient_handle_result(c, c1, n1, ok3, strlen(ok3)), 0);
    assert_int_equal(fm_devclient_handle_result(c, c2, n2, ok3, strlen(ok3)), 0);
    assert_int_equal(s.calls, 2);
    assert_int_equal(fm_devclient_handle_result(c, c3, n3, ok3, strlen(ok3)), 0);
    assert_int_equal(s.calls, 3);
    assert_string_equal(s.id, "again-1");

    fm_devclient_stats st;
    fm_devclient_get_stats(c, &st);
    assert_int_equal(st.results, 3);
    assert_true(st.ignored >= 6);
    assert_int_equal(fm_devclient_pending(c), 0);
    fm_devclient_free(c);
}

static void test_timeout_without_broker(void **state)
{
    (void)state;
    struct seen s = {0};
    /* 20 ms per attempt, 2 attempts: gives up after ~40 ms in total even
     * though it could never be sent. */
    fm_devclient *c = make_client(&s, 4, 20, 2);
    assert_int_equal(fm_devclient_publish_measurement(c, "{}", 2, "m-t"), 0);
    int t = fm_devclient_next_timeout_ms(c);
    assert_true(t >= 0 && t <= 1000);
    uint64_t start = fm_mono_ns();
    while (s.calls == 0 && fm_mono_ns() - start < 2000000000ull)
        assert_int_equal(fm_devclient_loop(c, 10), 0);
    assert_int_equal(s.calls, 1);
    assert_string_equal(s.status, "timeout");
    assert_string_equal(s.json, "");
    assert_true(s.info.latency_ns >= 40000000ull);
    fm_devclient_free(c);
}

/* ---- backoff ---------------------------------------------------------------- */

static void test_backoff(void **state)
{
    (void)state;
    /* Nominal delays double from min to max; jitter keeps them in [d/2, d]. */
    uint32_t nominal[] = {500, 1000, 2000, 4000, 8000, 16000, 30000, 30000};
    for (unsigned a = 0; a < 8; a++) {
        for (uint64_t r = 0; r < 2000; r += 37) {
            uint32_t d = fm_devclient_backoff_ms(a, 500, 30000, r * 0x9e3779b97f4a7c15ull);
            assert_true(d >= nominal[a] / 2);
            assert_true(d <= nominal[a]);
        }
    }
    /* Extremes: 0 random gives the floor, huge attempt counts stay capped. */
    assert_int_equal(fm_devclient_backoff_ms(0, 500, 30000, 0), 250);
    assert_true(fm_devclient_backoff_ms(1000000, 500, 30000, 7) <= 30000);
    assert_int_equal(fm_devclient_backoff_ms(3, 0, 0, 12345), 0);
    /* min > max is clamped to max. */
    assert_true(fm_devclient_backoff_ms(0, 5000, 1000, 99) <= 1000);
    /* Deterministic for the same inputs. */
    assert_int_equal(fm_devclient_backoff_ms(2, 500, 30000, 42), fm_devclient_backoff_ms(2, 500, 30000, 42));
}

/* ---- latency histogram ----------------------------------------------------- */

static void test_lathist_exact_small(void **state)
{
    (void)state;
    fm_lathist h;
    fm_lathist_reset(&h);
    assert_int_equal(fm_lathist_quantile(&h, 0.5), 0);
    /* 1..100 microseconds: below 64 us buckets are exact (1 us wide). */
    for (uint64_t us = 1; us <= 100; us++)
        fm_lathist_record(&h, us * 1000);
    assert_int_equal(h.count, 100);
    assert_int_equal(h.min_ns, 1000);
    assert_int_equal(h.max_ns, 100000);
    /* Nearest rank 50 is the 50 us sample, reported as its bucket's upper
     * bound (exclusive), i.e. within 1 us. */
    uint64_t p50 = fm_lathist_quantile(&h, 0.50);
    assert_true(p50 >= 50000 && p50 <= 51000);
    assert_int_equal(fm_lathist_quantile(&h, 1.0), 100000);
    assert_int_equal(fm_lathist_quantile(&h, 0.0), 1000);
    assert_int_equal(fm_lathist_quantile(&h, 0.999), 100000);
}

static void test_lathist_relative_error(void **state)
{
    (void)state;
    static fm_lathist h, a, b;
    fm_lathist_reset(&h);
    fm_lathist_reset(&a);
    fm_lathist_reset(&b);
    /* A log-spread sample set from 100 us to ~10 s. */
    uint64_t v[1000];
    double x = 100e3;
    for (int i = 0; i < 1000; i++) {
        v[i] = (uint64_t)x;
        x *= 1.0116;
        fm_lathist_record(&h, v[i]);
        fm_lathist_record(i % 2 ? &a : &b, v[i]);
    }
    double qs[] = {0.5, 0.9, 0.99, 0.999};
    for (size_t k = 0; k < sizeof qs / sizeof qs[0]; k++) {
        size_t rank = (size_t)(qs[k] * 1000.0 + 0.999999); /* 1-based nearest rank */
        double exact = (double)v[rank - 1];
        double got = (double)fm_lathist_quantile(&h, qs[k]);
        assert_true(got >= exact * 0.999);
        assert_true(got <= exact * 1.035);
    }
    /* Merging two halves equals recording everything. */
    fm_lathist_merge(&a, &b);
    assert_int_equal(a.count, h.count);
    assert_int_equal(a.max_ns, h.max_ns);
    assert_int_equal(a.min_ns, h.min_ns);
    assert_int_equal(fm_lathist_quantile(&a, 0.99), fm_lathist_quantile(&h, 0.99));
    /* Absurd values land in the last bucket without overflow. */
    fm_lathist_record(&h, UINT64_MAX / 2);
    assert_int_equal(fm_lathist_quantile(&h, 1.0), UINT64_MAX / 2);
}

/* ---- CLI argument validation (black box) ------------------------------------ */

static int run_cli(const char *args)
{
    const char *bin = getenv("FM_BINARY_DIR");
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s/fleetml %s >/dev/null 2>&1", bin, args);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void test_cli_usage_errors(void **state)
{
    (void)state;
    const char *bin = getenv("FM_BINARY_DIR");
    char path[1024];
    snprintf(path, sizeof path, "%s/fleetml", bin ? bin : "");
    if (!bin || access(path, X_OK) != 0)
        skip();
    assert_int_equal(run_cli("sim"), 2);
    assert_int_equal(run_cli("sim --devices 0 --rate 1"), 2);
    assert_int_equal(run_cli("sim --devices x --rate 1"), 2);
    assert_int_equal(run_cli("sim --devices 3"), 2);
    assert_int_equal(run_cli("sim --devices 3 --rate 1 --inflight 2"), 2);
    assert_int_equal(run_cli("sim --devices 3 --rate -1"), 2);
    assert_int_equal(run_cli("sim --devices 3 --rate nan"), 2);
    assert_int_equal(run_cli("sim --devices 3 --inflight 0"), 2);
    assert_int_equal(run_cli("sim --devices 3 --rate 1 --prefix BAD"), 2);
    assert_int_equal(run_cli("sim --devices 3 --rate 1 --duration 0"), 2);
    assert_int_equal(run_cli("sim --help"), 0);
    assert_int_equal(run_cli("device run"), 2);
    assert_int_equal(run_cli("device run Bad_Id"), 2);
    assert_int_equal(run_cli("device run dev-1 --interval 0"), 2);
    assert_int_equal(run_cli("device run dev-1 --count -3"), 2);
    assert_int_equal(run_cli("device run dev-1 --seed abc"), 2);
    assert_int_equal(run_cli("device run dev-1 extra"), 2);
    assert_int_equal(run_cli("device run --claim demo"), 2);
    assert_int_equal(run_cli("device run --serial S1"), 2);
    assert_int_equal(run_cli("device run dev-1 --outbox-max 0"), 2);
    assert_int_equal(run_cli("sim --devices 2 --rate 1 --claim demo --provision"), 2);
}

/* ---- SDK v2: outbox, identity file, state directory ------------------------ */

static void make_tmpdir(char *buf, size_t len)
{
    snprintf(buf, len, "/tmp/fm-test-device-XXXXXX");
    assert_non_null(mkdtemp(buf));
}

static void rm_rf(const char *dir)
{
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

static int count_files(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL)
        if (de->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

static void write_raw(const char *dir, const char *name, const char *data)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(data, f);
    fclose(f);
}

struct loaded {
    int n;
    char ids[8][FM_DEVICE_MEAS_ID_MAXLEN + 1];
    char data[8][64];
};

static void collect(void *ud, const char *id, const char *data, size_t len)
{
    struct loaded *l = ud;
    if (l->n < 8) {
        snprintf(l->ids[l->n], sizeof l->ids[0], "%s", id);
        snprintf(l->data[l->n], sizeof l->data[0], "%.*s", (int)len, data);
    }
    l->n++;
}

struct drops {
    int n;
    char last[FM_DEVICE_MEAS_ID_MAXLEN + 1];
};

static void on_drop(void *ud, const char *id)
{
    struct drops *d = ud;
    d->n++;
    snprintf(d->last, sizeof d->last, "%s", id);
}

static void test_outbox_put_load_remove(void **state)
{
    (void)state;
    char dir[64], ob_dir[128];
    make_tmpdir(dir, sizeof dir);
    snprintf(ob_dir, sizeof ob_dir, "%s/outbox", dir);
    fm_outbox *ob = NULL;
    fm_errbuf err;
    assert_int_equal(fm_outbox_open(ob_dir, 0, 0, FM_OUTBOX_REFUSE_NEW, &ob, &err), 0);
    assert_int_equal(fm_outbox_put(ob, "m-1", "{\"a\":1}", 7, NULL, NULL), 0);
    assert_int_equal(fm_outbox_put(ob, "m-2", "{\"a\":22}", 8, NULL, NULL), 0);
    assert_int_equal(fm_outbox_put(ob, "m-0", "{}", 2, NULL, NULL), 0);
    assert_int_equal(fm_outbox_put(ob, "m-1", "{}", 2, NULL, NULL), FM_EEXIST);
    assert_int_equal(fm_outbox_put(ob, "bad id", "{}", 2, NULL, NULL), FM_EINVAL);
    assert_int_equal(fm_outbox_put(ob, "m-9", "", 0, NULL, NULL), FM_EINVAL);
    assert_int_equal(fm_outbox_count(ob), 3);
    assert_int_equal(fm_outbox_bytes(ob), 17);
    assert_int_equal(count_files(ob_dir), 3);
    fm_outbox_close(ob);

    /* Reopened: the same entries, oldest first, content intact. */
    assert_int_equal(fm_outbox_open(ob_dir, 0, 0, FM_OUTBOX_REFUSE_NEW, &ob, &err), 0);
    struct loaded l = {0};
    assert_int_equal(fm_outbox_load(ob, collect, &l), 0);
    assert_int_equal(l.n, 3);
    assert_string_equal(l.ids[0], "m-1");
    assert_string_equal(l.ids[1], "m-2");
    assert_string_equal(l.ids[2], "m-0");
    assert_string_equal(l.data[1], "{\"a\":22}");
    assert_int_equal(fm_outbox_remove(ob, "m-2"), 0);
    assert_int_equal(fm_outbox_remove(ob, "m-2"), FM_ENOTFOUND);
    assert_false(fm_outbox_contains(ob, "m-2"));
    assert_int_equal(fm_outbox_count(ob), 2);
    assert_int_equal(fm_outbox_bytes(ob), 9);
    assert_int_equal(count_files(ob_dir), 2);
    fm_outbox_close(ob);
    rm_rf(dir);
}

static void test_outbox_bounds_and_policies(void **state)
{
    (void)state;
    char dir[64];
    make_tmpdir(dir, sizeof dir);
    fm_outbox *ob = NULL;
    fm_errbuf err;
    /* Refuse-new: entry count bound, then byte bound. */
    assert_int_equal(fm_outbox_open(dir, 2, 20, FM_OUTBOX_REFUSE_NEW, &ob, &err), 0);
    assert_int_equal(fm_outbox_put(ob, "a", "0123456789", 10, NULL, NULL), 0);
    assert_int_equal(fm_outbox_put(ob, "b", "0123456789ab", 12, NULL, NULL), FM_EBUSY);
    assert_int_equal(fm_outbox_put(ob, "b", "01234", 5, NULL, NULL), 0);
    assert_int_equal(fm_outbox_put(ob, "c", "0", 1, NULL, NULL), FM_EBUSY);
    assert_int_equal(fm_outbox_put(ob, "d", "012345678901234567890", 21, NULL, NULL), FM_ERANGE);
    assert_int_equal(count_files(dir), 2);
    assert_int_equal(fm_outbox_remove(ob, "a"), 0);
    assert_int_equal(fm_outbox_put(ob, "c", "0", 1, NULL, NULL), 0);
    fm_outbox_close(ob);
    rm_rf(dir);

    /* Drop-oldest: the new entry is kept, the oldest reported. */
    make_tmpdir(dir, sizeof dir);
    assert_int_equal(fm_outbox_open(dir, 2, 20, FM_OUTBOX_DROP_OLDEST, &ob, &err), 0);
    struct drops d = {0};
    assert_int_equal(fm_outbox_put(ob, "a", "0123456789", 10, on_drop, &d), 0);
    assert_int_equal(fm_outbox_put(ob, "b", "0123", 4, on_drop, &d), 0);
    assert_int_equal(d.n, 0);
    assert_int_equal(fm_outbox_put(ob, "c", "01", 2, on_drop, &d), 0);
    assert_int_equal(d.n, 1);
    assert_string_equal(d.last, "a");
    /* The byte bound can drop more than one. */
    assert_int_equal(fm_outbox_put(ob, "e", "0123456789abcdefghi", 19, on_drop, &d), 0);
    assert_int_equal(d.n, 3);
    assert_string_equal(d.last, "c");
    assert_int_equal(fm_outbox_count(ob), 1);
    assert_true(fm_outbox_contains(ob, "e"));
    assert_int_equal(count_files(dir), 1);
    fm_outbox_close(ob);
    rm_rf(dir);
}

static void test_outbox_crash_leftovers(void **state)
{
    (void)state;
    char dir[64], sub[128];
    make_tmpdir(dir, sizeof dir);
    write_raw(dir, "m-ok.json", "{\"x\":1}");
    write_raw(dir, "m-half.json.tmp.4242", "{\"x\""); /* write cut short by a crash */
    write_raw(dir, "m-empty.json", "");
    write_raw(dir, "bad id.json", "{}");
    write_raw(dir, "notes.txt", "hello");
    snprintf(sub, sizeof sub, "%s/subdir", dir);
    assert_int_equal(mkdir(sub, 0700), 0);
    fm_outbox *ob = NULL;
    fm_errbuf err;
    assert_int_equal(fm_outbox_open(dir, 0, 0, FM_OUTBOX_REFUSE_NEW, &ob, &err), 0);
    assert_int_equal(fm_outbox_count(ob), 1);
    assert_true(fm_outbox_contains(ob, "m-ok"));
    assert_int_equal(count_files(dir), 2); /* m-ok.json and the untouched subdir */
    /* A temp file of the new entry's own name never blocks a write. */
    write_raw(dir, "m-new.json.tmp.1", "junk");
    assert_int_equal(fm_outbox_put(ob, "m-new", "{}", 2, NULL, NULL), 0);
    fm_outbox_close(ob);
    rm_rf(dir);
}

static void test_identity_file(void **state)
{
    (void)state;
    fm_device_identity id;
    fm_errbuf err;
    const char *good = "{\"device_id\":\"demo-sn-1\",\"serial\":\"SN-1\","
                       "\"endpoint\":{\"host\":\"mqtt.example\",\"port\":8883}}";
    assert_int_equal(fm_device_identity_parse(good, strlen(good), &id, &err), 0);
    assert_string_equal(id.device_id, "demo-sn-1");
    assert_string_equal(id.serial, "SN-1");
    assert_string_equal(id.host, "mqtt.example");
    assert_int_equal(id.port, 8883);
    const char *minimal = "{\"device_id\":\"abc\"}";
    assert_int_equal(fm_device_identity_parse(minimal, strlen(minimal), &id, &err), 0);
    assert_string_equal(id.host, "");
    assert_int_equal(id.port, 0);
    const char *bad[] = {
        "", "[]", "{\"device_id\":\"Bad_Id\"}", "{\"serial\":\"x\"}",
        "{\"device_id\":\"abc\",\"endpoint\":{\"host\":\"h\",\"port\":0}}",
        "{\"device_id\":\"abc\",\"endpoint\":{\"host\":\"h\",\"port\":70000}}",
        "{\"device_id\":\"abc\",\"endpoint\":{\"port\":1}}", "{\"device_id\":\"abc\",\"serial\":5}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(fm_device_identity_parse(bad[i], strlen(bad[i]), &id, &err), FM_EINVAL);

    char dir[64], path[128];
    make_tmpdir(dir, sizeof dir);
    snprintf(path, sizeof path, "%s/identity.json", dir);
    assert_int_equal(fm_device_identity_read(path, &id, &err), FM_ENOTFOUND);
    fm_device_identity w = {.device_id = "dev-xyz", .serial = "S1", .host = "h.example", .port = 1883};
    assert_int_equal(fm_device_identity_write(path, &w, &err), 0);
    assert_int_equal(fm_device_identity_read(path, &id, &err), 0);
    assert_string_equal(id.device_id, "dev-xyz");
    assert_string_equal(id.host, "h.example");
    assert_int_equal(id.port, 1883);
    rm_rf(dir);
}

static fm_devclient *state_client(struct seen *s, const char *state_dir, int max_entries,
                                  enum fm_outbox_policy policy)
{
    fm_devclient_opts o = {
        .id = "dev-test",
        .ca_path = "/nonexistent/ca.crt",
        .cert_path = "/nonexistent/device.crt",
        .key_path = "/nonexistent/device.key",
        .on_result = on_result,
        .ud = s,
        .state_dir = state_dir,
        .outbox_max_entries = max_entries,
        .outbox_policy = policy,
    };
    fm_devclient *c = NULL;
    fm_errbuf err;
    assert_int_equal(fm_devclient_new(&o, &c, &err), 0);
    s->c = c;
    return c;
}

static void answer(fm_devclient *c, const char *mid, const char *doc)
{
    uint8_t corr[FM_DEVCLIENT_CORR_LEN];
    size_t n = 0;
    assert_int_equal(fm_devclient_correlation(c, mid, corr, sizeof corr, &n), 0);
    assert_int_equal(fm_devclient_handle_result(c, corr, n, doc, strlen(doc)), 0);
}

static void test_client_outbox_survives_restart(void **state)
{
    (void)state;
    char dir[64], ob_dir[128];
    make_tmpdir(dir, sizeof dir);
    snprintf(ob_dir, sizeof ob_dir, "%s/outbox", dir);
    struct seen s = {0};
    fm_devclient *c = state_client(&s, dir, 0, FM_OUTBOX_REFUSE_NEW);
    assert_int_equal(fm_devclient_publish_measurement(c, "{\"id\":\"m-1\"}", 12, "m-1"), 0);
    assert_int_equal(fm_devclient_publish_measurement(c, "{\"id\":\"m-2\"}", 12, "m-2"), 0);
    assert_int_equal(count_files(ob_dir), 2);
    fm_devclient_free(c); /* like a crash: nothing answered */
    assert_int_equal(count_files(ob_dir), 2);

    c = state_client(&s, dir, 0, FM_OUTBOX_REFUSE_NEW);
    assert_int_equal(fm_devclient_pending(c), 2);
    fm_devclient_stats st;
    fm_devclient_get_stats(c, &st);
    assert_int_equal(st.recovered, 2);
    assert_int_equal(fm_devclient_publish_measurement(c, "{}", 2, "m-1"), FM_EEXIST);

    /* Retryable errors keep the entry; final results delete it. */
    answer(c, "m-1", "{\"id\":\"m-1\",\"status\":\"error\",\"error\":{\"code\":\"unavailable\",\"message\":\"x\"}}");
    assert_int_equal(s.calls, 0);
    assert_int_equal(fm_devclient_pending(c), 2);
    answer(c, "m-1", "{\"id\":\"m-1\",\"status\":\"ok\"}");
    assert_int_equal(s.calls, 1);
    assert_string_equal(s.status, "ok");
    answer(c, "m-2", "{\"id\":\"m-2\",\"status\":\"error\",\"error\":{\"code\":\"invalid_measurement\",\"message\":\"x\"}}");
    assert_int_equal(s.calls, 2);
    assert_string_equal(s.status, "error");
    assert_int_equal(fm_devclient_pending(c), 0);
    assert_int_equal(count_files(ob_dir), 0);

    /* In outbox mode nothing times out. */
    assert_int_equal(fm_devclient_publish_measurement(c, "{}", 2, "m-3"), 0);
    assert_int_equal(fm_devclient_loop_misc(c), 0);
    assert_int_equal(s.calls, 2);
    fm_devclient_free(c);
    rm_rf(dir);
}

static void test_client_outbox_full(void **state)
{
    (void)state;
    char dir[64], ob_dir[128];
    make_tmpdir(dir, sizeof dir);
    snprintf(ob_dir, sizeof ob_dir, "%s/outbox", dir);
    struct seen s = {0};
    fm_devclient *c = state_client(&s, dir, 2, FM_OUTBOX_REFUSE_NEW);
    assert_int_equal(fm_devclient_publish_measurement(c, "{}", 2, "m-1"), 0);
    assert_int_equal(fm_devclient_publish_measurement(c, "{}", 2, "m-2"), 0);
    assert_int_equal(fm_devclient_publish_measurement(c, "{}", 2, "m-3"), FM_EBUSY);
    assert_int_equal(count_files(ob_dir), 2);
    fm_devclient_free(c);
    rm_rf(dir);

    make_tmpdir(dir, sizeof dir);
    snprintf(ob_dir, sizeof ob_dir, "%s/outbox", dir);
    memset(&s, 0, sizeof s);
    c = state_client(&s, dir, 2, FM_OUTBOX_DROP_OLDEST);
    assert_int_equal(fm_devclient_publish_measurement(c, "{}", 2, "m-1"), 0);
    assert_int_equal(fm_devclient_publish_measurement(c, "{}", 2, "m-2"), 0);
    assert_int_equal(fm_devclient_publish_measurement(c, "{}", 2, "m-3"), 0);
    assert_int_equal(fm_devclient_publish_measurement(c, "{}", 2, "m-4"), 0);
    assert_int_equal(s.calls, 0); /* never from inside publish */
    assert_int_equal(fm_devclient_pending(c), 2);
    assert_int_equal(count_files(ob_dir), 2);
    assert_int_equal(fm_devclient_loop_misc(c), 0);
    assert_int_equal(s.calls, 2);
    assert_string_equal(s.status, "dropped");
    assert_string_equal(s.id, "m-2");
    fm_devclient_stats st;
    fm_devclient_get_stats(c, &st);
    assert_int_equal(st.dropped, 2);
    fm_devclient_free(c);
    rm_rf(dir);
}

static void test_claim_options(void **state)
{
    (void)state;
    char dir[64], path[128];
    make_tmpdir(dir, sizeof dir);
    struct seen s = {0};
    fm_devclient_claim cl = {.cert_path = "/nonexistent/claim.crt",
                             .key_path = "/nonexistent/claim.key",
                             .serial = "SN-0001"};
    fm_devclient_opts o = {.ca_path = "/nonexistent/ca.crt", .on_result = on_result, .ud = &s,
                           .claim = &cl};
    fm_devclient *c = NULL;
    fm_errbuf err;
    assert_int_equal(fm_devclient_new(&o, &c, &err), FM_EINVAL); /* no state_dir */
    o.state_dir = dir;
    cl.serial = "bad serial";
    assert_int_equal(fm_devclient_new(&o, &c, &err), FM_EINVAL);
    cl.serial = "SN-0001";
    assert_int_equal(fm_devclient_new(&o, &c, &err), 0);
    assert_true(fm_devclient_claiming(c));
    assert_string_equal(fm_devclient_id(c), "");
    assert_false(fm_devclient_ready(c));
    /* The claim certificate is unusable: connecting fails, after the
     * device key was created (0600) for the CSR. */
    assert_int_not_equal(fm_devclient_connect(c, &err), 0);
    snprintf(path, sizeof path, "%s/device.key", dir);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    fm_devclient_free(c);

    /* device.crt without identity.json is a broken state directory. */
    write_raw(dir, "device.crt", "x");
    assert_int_equal(fm_devclient_new(&o, &c, &err), FM_EINVAL);
    assert_non_null(strstr(err.msg, "identity"));
    write_raw(dir, "identity.json", "{\"device_id\":\"demo-sn-0001\"}");
    assert_int_equal(fm_devclient_new(&o, &c, &err), 0);
    assert_false(fm_devclient_claiming(c));
    assert_string_equal(fm_devclient_id(c), "demo-sn-0001");
    fm_devclient_free(c);

    /* An interrupted rotation is finished on start: key then cert renamed. */
    write_raw(dir, "device.key.next", "newkey");
    write_raw(dir, "device.crt.next", "newcert");
    assert_int_equal(fm_devclient_new(&o, &c, &err), 0);
    fm_devclient_free(c);
    snprintf(path, sizeof path, "%s/device.crt.next", dir);
    assert_int_not_equal(access(path, F_OK), 0);
    snprintf(path, sizeof path, "%s/device.key.next", dir);
    assert_int_not_equal(access(path, F_OK), 0);
    char *text = NULL;
    size_t len = 0;
    snprintf(path, sizeof path, "%s/device.crt", dir);
    assert_int_equal(fm_read_file(path, &text, &len), 0);
    assert_string_equal(text, "newcert");
    fm_free(text);
    rm_rf(dir);
}

int main(void)
{
    /* The SDK logs retries and connection events; keep test output clean. */
    fm_log_set_level(FM_LOG_ERROR);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_new_validates),
        cmocka_unit_test(test_connect_missing_files),
        cmocka_unit_test(test_measurement_id_valid),
        cmocka_unit_test(test_publish_queue_limits),
        cmocka_unit_test(test_result_matching),
        cmocka_unit_test(test_timeout_without_broker),
        cmocka_unit_test(test_backoff),
        cmocka_unit_test(test_lathist_exact_small),
        cmocka_unit_test(test_lathist_relative_error),
        cmocka_unit_test(test_cli_usage_errors),
        cmocka_unit_test(test_outbox_put_load_remove),
        cmocka_unit_test(test_outbox_bounds_and_policies),
        cmocka_unit_test(test_outbox_crash_leftovers),
        cmocka_unit_test(test_identity_file),
        cmocka_unit_test(test_client_outbox_survives_restart),
        cmocka_unit_test(test_client_outbox_full),
        cmocka_unit_test(test_claim_options),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
