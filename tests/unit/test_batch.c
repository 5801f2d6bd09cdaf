/*
 * The group commit's phases (src/pipeline/batch.c), each on its own, with a
 * fake store (device rows, insert-or-ignore by key, failures on demand) and
 * a fake model (one output: the first feature, the temperature). Checks
 * the order of decisions: device before payload, verdicts and repeats,
 * quarantine only for the payload's own faults, a stored result read only
 * when the key already existed, and nothing published before the commit.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "fleetml/viscometer.h"
#include "pipeline/batch.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- fakes ------------------------------------------------------------------ */

#define STORED_MAX 32

typedef struct fake_store {
    fm_store base;
    int fail_commit;
    int commits, lookups;
    size_t nstored;
    char stored_ids[STORED_MAX][FM_MEAS_ID_MAX + 1];
    char stored_docs[STORED_MAX][256];
    size_t last_nq;
    char last_quar_codes[8][32];
} fake_store;

static int f_device_get(fm_store *s, const char *id, fm_device *out)
{
    (void)s;
    memset(out, 0, sizeof *out);
    if (strcmp(id, "dev-a") == 0 || strcmp(id, "dev-off") == 0 || strcmp(id, "dev-c") == 0 ||
        strcmp(id, "dev-s") == 0) {
        snprintf(out->id, sizeof out->id, "%s", id);
        snprintf(out->tenant, sizeof out->tenant, "t1");
        out->status = strcmp(id, "dev-off") != 0 ? FM_DEVICE_ACTIVE : FM_DEVICE_DISABLED;
        return 0;
    }
    if (strcmp(id, "dev-broken") == 0)
        return FM_EDB;
    return FM_ENOTFOUND;
}

static int find_stored(fake_store *f, const char *mid)
{
    for (size_t i = 0; i < f->nstored; i++)
        if (strcmp(f->stored_ids[i], mid) == 0)
            return (int)i;
    return -1;
}

static int f_result_lookup(fm_store *s, const char *dev, const char *mid, char **result)
{
    fake_store *f = (fake_store *)s;
    (void)dev;
    f->lookups++;
    int i = find_stored(f, mid);
    if (i < 0)
        return FM_ENOTFOUND;
    *result = fm_strdup(f->stored_docs[i]);
    return *result ? 0 : FM_ENOMEM;
}

static int f_commit(fm_store *s, fm_record *recs, size_t n, fm_quarantine *q, size_t nq,
                    fm_errbuf *err)
{
    fake_store *f = (fake_store *)s;
    f->commits++;
    if (f->fail_commit)
        return fm_errf(err, FM_EIO, "injected failure");
    for (size_t i = 0; i < n; i++) {
        recs[i].existed = find_stored(f, recs[i].measurement_id) >= 0;
        if (recs[i].existed)
            continue;
        assert_true(f->nstored < STORED_MAX);
        snprintf(f->stored_ids[f->nstored], sizeof f->stored_ids[0], "%s",
                 recs[i].measurement_id);
        snprintf(f->stored_docs[f->nstored], sizeof f->stored_docs[0], "%s",
                 recs[i].result_json);
        recs[i].seq = (int64_t)++f->nstored;
    }
    f->last_nq = nq;
    for (size_t i = 0; i < nq && i < 8; i++)
        snprintf(f->last_quar_codes[i], sizeof f->last_quar_codes[0], "%s", q[i].error_code);
    return 0;
}

/* The pipeline needs two concerns of the store: devices and records. */
static const fm_store_vtable fake_vt = {.name = "fake"};
static const fm_store_registry_vt fake_registry = {.device_get = f_device_get};
static const fm_store_records_vt fake_records = {
    .result_lookup = f_result_lookup,
    .commit = f_commit,
};

/* Two fake models: slot 0 answers the first feature, slot 1 that plus
 * 1000; devices named dev-c are scored by slot 1 (a canary). */
typedef struct fake_model {
    int fail;
    int calls;
    size_t rows;
} fake_model;

static size_t m_pick(void *ud, const fm_device *dev)
{
    (void)ud;
    return strcmp(dev->id, "dev-c") == 0 ? 1 : 0;
}

/* Tenant t1's shadow is slot 1 for devices named dev-s. */
static size_t m_shadow(void *ud, const fm_device *dev)
{
    (void)ud;
    return strcmp(dev->id, "dev-s") == 0 ? 1 : FM_SERVING_NONE;
}

static int m_predict(void *ud, size_t slot, const float *feat, const char *const *payloads,
                     size_t rows, float *out, fm_errbuf *err)
{
    for (size_t i = 0; i < rows; i++)
        assert_non_null(payloads[i]); /* each row's measurement comes along */
    fake_model *m = ud;
    m->calls++;
    m->rows = rows;
    if (m->fail)
        return fm_errf(err, FM_EINVAL, "injected failure");
    for (size_t i = 0; i < rows; i++)
        out[i * FM_OUTPUTS_MAX] = feat[i * fm_feature_count()] + (slot ? 1000.0f : 0.0f);
    return 0;
}

static const char *m_ref(void *ud, size_t slot)
{
    (void)ud;
    return slot ? "fake@2" : "fake@1";
}

static char *m_ok_doc(void *ud, size_t slot, const char *mid, const float *out, int64_t recv_ms)
{
    (void)recv_ms;
    char buf[160];
    snprintf(buf, sizeof buf, "{\"id\":\"%s\",\"status\":\"ok\",\"model\":\"%s\",\"t\":%.2f}",
             mid, m_ref(ud, slot), out[0]);
    return fm_strdup(buf);
}

#define REPLIES_MAX 16

typedef struct published {
    int n;
    char docs[REPLIES_MAX][512];
} published;

static int p_publish(void *ud, const char *topic, const void *payload, size_t len,
                     const void *corr, size_t corr_len)
{
    (void)topic, (void)corr, (void)corr_len;
    published *p = ud;
    assert_true(p->n < REPLIES_MAX);
    snprintf(p->docs[p->n++], sizeof p->docs[0], "%.*s", (int)len, (const char *)payload);
    return 0;
}

static int d_lookup(void *ud, const char *id, fm_device *out)
{
    return fm_store_device_get(ud, id, out);
}

typedef struct fx {
    fake_store store;
    fake_model model;
    batch_scorer scorer;
    published pub;
    batch_env env;
    fm_rng rng;
} fx;

static int setup(void **state)
{
    fx *f = calloc(1, sizeof *f);
    f->store.base.vt = &fake_vt;
    f->store.base.registry = &fake_registry;
    f->store.base.records = &fake_records;
    f->scorer = (batch_scorer){.pick = m_pick, .shadow_pick = m_shadow, .predict = m_predict, .ok_doc = m_ok_doc,
                               .model_ref = m_ref, .ud = &f->model};
    f->env = (batch_env){.store = &f->store.base, .device_lookup = d_lookup,
                         .device_ud = &f->store.base, .scorer = &f->scorer,
                         .publish = p_publish, .publish_ud = &f->pub,
                         .max_payload = FM_MEAS_MAX_BYTES};
    fm_rng_seed(&f->rng, 7);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    free(*state);
    return 0;
}

/* A valid simulator sweep with id mid at 37.00 degC... as drawn. */
static fm_inmsg *valid(fx *f, const char *dev, const char *mid)
{
    fm_visc_truth t;
    fm_visc_draw_truth(&f->rng, &t);
    char *doc;
    size_t len;
    assert_int_equal(fm_visc_measurement_json(&f->rng, &t, mid, "fw-1", fm_wall_ms(), &doc, &len),
                     0);
    fm_inmsg *m = fm_inmsg_new(dev, doc, len, NULL, NULL, 0);
    fm_free(doc);
    assert_non_null(m);
    return m;
}

static fm_inmsg *raw(const char *dev, const char *payload)
{
    fm_inmsg *m = fm_inmsg_new(dev, payload, strlen(payload), NULL, NULL, 0);
    assert_non_null(m);
    return m;
}

/* Links msgs into a list and starts a batch over it. */
static void start(batch *b, fm_inmsg **msgs, size_t n)
{
    for (size_t i = 0; i + 1 < n; i++)
        msgs[i]->next = msgs[i + 1];
    msgs[n - 1]->next = NULL;
    assert_int_equal(batch__init(b, msgs[0], n), 0);
}

static void run_all(batch *b, const batch_env *env)
{
    batch__admit(b, env);
    batch__infer(b, env);
    batch__build_rows(b, env);
    batch__commit(b, env);
    batch__reply(b, env);
}

static bool has(const char *doc, const char *needle) { return strstr(doc, needle) != NULL; }

/* ---- tests ------------------------------------------------------------------- */

static void test_admit_verdicts_in_order(void **state)
{
    fx *f = *state;
    fm_inmsg *msgs[] = {
        valid(f, "dev-a", "m-1"),
        valid(f, "dev-nobody", "m-2"),      /* unknown device, before the payload */
        raw("dev-off", "{not json"),        /* disabled: the device is judged first */
        raw("dev-a", "{\"id\":\"m-3\"}"),   /* missing fields */
        valid(f, "dev-broken", "m-4"),      /* registry unavailable */
        valid(f, "dev-a", "m-1"),           /* repeat inside the batch */
    };
    batch b;
    start(&b, msgs, 6);
    batch__admit(&b, &f->env);
    assert_false(b.items[0].rejected);
    assert_string_equal(b.items[1].verr.code, FM_VERR_UNKNOWN_DEVICE);
    assert_string_equal(b.items[2].verr.code, FM_VERR_DEVICE_INACTIVE);
    assert_string_equal(b.items[3].verr.code, FM_VERR_MISSING_FIELD);
    assert_string_equal(b.items[4].verr.code, FM_VERR_UNAVAILABLE);
    assert_true(b.items[5].follower);
    assert_int_equal(b.items[5].leader, 0);
    assert_int_equal(b.rows, 1); /* only the first m-1 is scored */
    assert_int_equal(f->store.lookups, 0);
    assert_int_equal(f->pub.n, 0);
    batch__release(&b);
}

/* Repeats in a large batch: each (device, id) leads once, a repeat follows
 * its first row wherever it is, and the same id from another device is a
 * row of its own (the index is keyed by both). */
static void test_repeats_in_a_large_batch(void **state)
{
    fx *f = *state;
    enum { N = 600, IDS = 97 };
    fm_inmsg *msgs[N];
    for (size_t i = 0; i < N; i++) {
        char mid[32];
        snprintf(mid, sizeof mid, "m-%zu", i % IDS);
        msgs[i] = valid(f, i % 2 ? "dev-a" : "dev-c", mid);
    }
    batch b;
    start(&b, msgs, N);
    batch__admit(&b, &f->env);
    size_t rows = 0;
    for (size_t i = 0; i < N; i++) {
        /* The first occurrence of (device, id) is at i % (2 * IDS). */
        size_t first = i % (2 * IDS);
        if (first == i) {
            assert_false(b.items[i].follower);
            rows++;
        } else {
            assert_true(b.items[i].follower);
            assert_int_equal(b.items[i].leader, first);
        }
    }
    assert_int_equal(rows, 2 * IDS);
    assert_int_equal(b.rows, 2 * IDS);
    batch__release(&b);
}

static void test_rows_and_quarantine(void **state)
{
    fx *f = *state;
    fm_inmsg *msgs[] = {valid(f, "dev-a", "m-1"), raw("dev-a", "[1,2]"),
                        valid(f, "dev-broken", "m-4")};
    batch b;
    start(&b, msgs, 3);
    batch__admit(&b, &f->env);
    batch__infer(&b, &f->env);
    assert_int_equal(f->model.calls, 1);
    assert_int_equal(f->model.rows, 1);
    batch__build_rows(&b, &f->env);
    assert_int_equal(b.nr, 1);
    assert_string_equal(b.recs[0].measurement_id, "m-1");
    assert_string_equal(b.recs[0].model, "fake@1");
    /* The payload's fault is quarantined; the registry's is not. */
    assert_int_equal(b.nq, 1);
    assert_string_equal(b.quar[0].error_code, FM_VERR_INVALID_TYPE);
    assert_int_equal(f->pub.n, 0); /* nothing is published before the commit */
    assert_true(batch__commit(&b, &f->env));
    assert_int_equal(f->store.commits, 1);
    assert_int_equal(f->store.last_nq, 1);
    assert_int_equal(b.stored, 1);
    batch__reply(&b, &f->env);
    assert_int_equal(f->pub.n, 3);
    assert_true(has(f->pub.docs[0], "\"id\":\"m-1\",\"status\":\"ok\""));
    assert_true(has(f->pub.docs[1], FM_VERR_INVALID_TYPE));
    assert_true(has(f->pub.docs[2], FM_VERR_UNAVAILABLE) && has(f->pub.docs[2], "m-4"));
    batch__release(&b);
}

/* One batch, two models: each row is scored, answered and stored by the
 * version its device is deployed to (a canary beside production). */
static void test_rows_scored_by_their_slot(void **state)
{
    fx *f = *state;
    fm_inmsg *msgs[] = {valid(f, "dev-a", "m-1"), valid(f, "dev-c", "m-2"),
                        valid(f, "dev-a", "m-3")};
    batch b;
    start(&b, msgs, 3);
    batch__admit(&b, &f->env);
    batch__infer(&b, &f->env);
    assert_int_equal(f->model.calls, 2); /* the whole matrix, then slot 1's row */
    batch__build_rows(&b, &f->env);
    assert_int_equal(b.nr, 3);
    assert_string_equal(b.recs[0].model, "fake@1");
    assert_string_equal(b.recs[1].model, "fake@2");
    assert_string_equal(b.recs[2].model, "fake@1");
    float t0 = b.pred[b.items[0].row * FM_OUTPUTS_MAX], t1 = b.pred[b.items[1].row * FM_OUTPUTS_MAX];
    float f1 = b.feat[b.items[1].row * fm_feature_count()];
    assert_true(t0 < 1000.0f);
    assert_true(t1 == f1 + 1000.0f);
    assert_true(batch__commit(&b, &f->env));
    batch__reply(&b, &f->env);
    assert_int_equal(f->pub.n, 3);
    assert_true(has(f->pub.docs[1], "\"model\":\"fake@2\""));
    assert_true(has(f->pub.docs[2], "\"model\":\"fake@1\""));
    batch__release(&b);
}

/* A shadow version scores beside the live one: its answer is stored with
 * the row and never published; a failing shadow costs only its answers. */
static void test_shadow_stored_not_sent(void **state)
{
    fx *f = *state;
    fm_inmsg *msgs[] = {valid(f, "dev-s", "m-1"), valid(f, "dev-a", "m-2")};
    batch b;
    start(&b, msgs, 2);
    run_all(&b, &f->env);
    assert_int_equal(b.nr, 2);
    assert_non_null(b.recs[0].shadow_json);
    assert_true(has(b.recs[0].shadow_json, "\"model\":\"fake@2\""));
    assert_string_equal(b.recs[0].model, "fake@1");
    assert_null(b.recs[1].shadow_json);
    assert_int_equal(f->pub.n, 2);
    for (int i = 0; i < 2; i++)
        assert_false(has(f->pub.docs[i], "fake@2"));
    batch__release(&b);
}

/* Dedupe by key: fresh ids cost no read; a stored id is found by the
 * commit and answered with the stored document, byte for byte. */
static void test_dedupe_by_key(void **state)
{
    fx *f = *state;
    fm_inmsg *first[] = {valid(f, "dev-a", "m-1"), valid(f, "dev-a", "m-2")};
    batch b;
    start(&b, first, 2);
    run_all(&b, &f->env);
    batch__release(&b);
    assert_int_equal(f->store.lookups, 0);
    assert_int_equal(f->store.nstored, 2);
    char original[512];
    snprintf(original, sizeof original, "%s", f->pub.docs[0]);

    f->pub.n = 0;
    fm_inmsg *again[] = {valid(f, "dev-a", "m-1"), valid(f, "dev-a", "m-3"),
                         valid(f, "dev-a", "m-1")};
    start(&b, again, 3);
    run_all(&b, &f->env);
    assert_true(b.items[0].existed);
    assert_true(b.items[2].follower);
    assert_int_equal(b.stored, 1);
    batch__release(&b);
    assert_int_equal(f->store.lookups, 1); /* only the existing key is read */
    assert_int_equal(f->store.nstored, 3);
    assert_int_equal(f->pub.n, 3);
    assert_string_equal(f->pub.docs[0], original);
    assert_string_equal(f->pub.docs[2], original);
    assert_true(has(f->pub.docs[1], "\"id\":\"m-3\""));
}

static void test_commit_failure_answers_unavailable(void **state)
{
    fx *f = *state;
    f->store.fail_commit = 1;
    fm_inmsg *msgs[] = {valid(f, "dev-a", "m-1"), valid(f, "dev-a", "m-1"),
                        raw("dev-a", "{")};
    batch b;
    start(&b, msgs, 3);
    batch__admit(&b, &f->env);
    batch__infer(&b, &f->env);
    batch__build_rows(&b, &f->env);
    assert_false(batch__commit(&b, &f->env));
    assert_string_equal(b.commit_err.msg, "injected failure");
    batch__reply(&b, &f->env);
    batch__release(&b);
    assert_int_equal(f->pub.n, 3);
    for (int i = 0; i < 2; i++)
        assert_true(has(f->pub.docs[i], FM_VERR_UNAVAILABLE));
    /* A malformed payload keeps its own verdict. */
    assert_true(has(f->pub.docs[2], FM_VERR_MALFORMED_JSON));
    assert_int_equal(f->store.nstored, 0);
}

static void test_inference_failure_is_internal(void **state)
{
    fx *f = *state;
    f->model.fail = 1;
    fm_inmsg *msgs[] = {valid(f, "dev-a", "m-1")};
    batch b;
    start(&b, msgs, 1);
    run_all(&b, &f->env);
    assert_false(b.model_ok);
    /* Not the payload's fault: nothing stored, nothing quarantined. */
    assert_int_equal(b.nr + b.nq, 0);
    assert_int_equal(f->store.commits, 0);
    batch__release(&b);
    assert_int_equal(f->pub.n, 1);
    assert_true(has(f->pub.docs[0], FM_VERR_INTERNAL));
}

static int hook_calls;
static char hook_doc[512];

static void hook(void *ud, const char *doc, size_t len)
{
    (void)ud;
    hook_calls++;
    snprintf(hook_doc, sizeof hook_doc, "%.*s", doc ? (int)len : 4, doc ? doc : "NULL");
}

/* A message with a reply hook is answered through it once; released
 * unanswered, it is told so with NULL; freed unsubmitted, never. */
static void test_reply_hook(void **state)
{
    fx *f = *state;
    fm_inmsg *m = valid(f, "dev-a", "m-9");
    fm_inmsg_set_reply(m, hook, NULL);
    batch b;
    start(&b, &m, 1);
    run_all(&b, &f->env);
    batch__release(&b);
    assert_int_equal(hook_calls, 1);
    assert_true(has(hook_doc, "\"id\":\"m-9\""));
    assert_int_equal(f->pub.n, 0);

    hook_calls = 0;
    m = valid(f, "dev-a", "m-10");
    fm_inmsg_set_reply(m, hook, NULL);
    start(&b, &m, 1);
    batch__release(&b); /* dropped before any phase */
    assert_int_equal(hook_calls, 1);
    assert_string_equal(hook_doc, "NULL");

    hook_calls = 0;
    m = valid(f, "dev-a", "m-11");
    fm_inmsg_set_reply(m, hook, NULL);
    fm_inmsg_free(m);
    assert_int_equal(hook_calls, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_admit_verdicts_in_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rows_and_quarantine, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rows_scored_by_their_slot, setup, teardown),
        cmocka_unit_test_setup_teardown(test_shadow_stored_not_sent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dedupe_by_key, setup, teardown),
        cmocka_unit_test_setup_teardown(test_repeats_in_a_large_batch, setup, teardown),
        cmocka_unit_test_setup_teardown(test_commit_failure_answers_unavailable, setup, teardown),
        cmocka_unit_test_setup_teardown(test_inference_failure_is_internal, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reply_hook, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
