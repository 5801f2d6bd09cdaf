/*
 * Events, rules and the rules engine (fleetml/events.h, fleetml/rules.h):
 * event documents from committed rows, rule documents checked and their
 * jq programs run, the rules' store concern (on SQLite, or on PostgreSQL
 * when FM_TEST_STORE_URL is set), and the engine end to end on a store and
 * a directory lake: delivery to a lake target, and a failing target
 * dead-lettered after its retries while the rule moves on.
 */
#include "store_backend.h"

#include "fleetml/events.h"
#include "fleetml/lake.h"
#include "fleetml/rules.h"
#include "fleetml/store.h"

#include <dirent.h>
#include <ftw.h>
#include <jansson.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

static json_t *J(const char *text)
{
    json_error_t e;
    json_t *j = json_loads(text, 0, &e);
    if (!j)
        fail_msg("bad test JSON: %s: %s", text, e.text);
    return j;
}

/* fm_rule_check on text: the code, and err's message in msg. */
static int check(const char *text, json_t **out, char *msg, size_t len)
{
    json_t *doc = J(text);
    fm_errbuf err = {0};
    json_t *o = NULL;
    int rc = fm_rule_check(doc, FM_RULE_LOOPBACK_HTTP, &o, &err);
    json_decref(doc);
    snprintf(msg, len, "%s", err.msg);
    if (out)
        *out = o;
    else
        json_decref(o);
    return rc;
}

static void test_rule_check(void **state)
{
    (void)state;
    char msg[600];
    json_t *r = NULL;
    assert_int_equal(check("{\"name\":\"low-hct\",\"event\":\"result.produced\","
                           "\"filter\":\".data.outputs.hematocrit_pct < 30\","
                           "\"targets\":[{\"type\":\"webhook\",\"url\":\"https://h.example/x\","
                           "\"secret\":\"0123456789abcdef\"},{\"type\":\"lake\",\"prefix\":\"a/b\"}]}",
                           &r, msg, sizeof msg),
                     0);
    /* Defaults filled in. */
    assert_string_equal(json_string_value(json_object_get(r, "transform")), "");
    assert_int_equal(json_integer_value(json_object_get(r, "retries")), 3);
    assert_true(json_is_true(json_object_get(r, "enabled")));
    json_t *wh = json_array_get(json_object_get(r, "targets"), 0);
    assert_int_equal(json_integer_value(json_object_get(wh, "timeout_ms")), 5000);
    /* Shown without its secret. */
    json_t *shown = fm_rule_redacted(r);
    assert_string_equal(
        json_string_value(json_object_get(json_array_get(json_object_get(shown, "targets"), 0),
                                          "secret")),
        "********");
    assert_string_equal(json_string_value(json_object_get(wh, "secret")), "0123456789abcdef");
    json_decref(shown);
    json_decref(r);

    static const struct {
        const char *doc, *why;
    } bad[] = {
        {"{\"name\":\"x\",\"event\":\"result.produced\",\"targets\":[{\"type\":\"shadow\"}],"
         "\"colour\":1}", "unknown field 'colour'"},
        {"{\"name\":\"X!\",\"event\":\"result.produced\",\"targets\":[{\"type\":\"shadow\"}]}",
         "name"},
        {"{\"name\":\"x\",\"event\":\"result.eaten\",\"targets\":[{\"type\":\"shadow\"}]}",
         "unknown event type"},
        {"{\"name\":\"x\",\"event\":\"result.produced\",\"filter\":\".a | [\","
         "\"targets\":[{\"type\":\"shadow\"}]}", "jq cannot compile"},
        {"{\"name\":\"x\",\"event\":\"result.produced\",\"targets\":[]}", "targets"},
        {"{\"name\":\"x\",\"event\":\"result.produced\",\"targets\":[{\"type\":\"webhook\","
         "\"url\":\"http://his.example/\",\"secret\":\"0123456789abcdef\"}]}", "https://"},
        {"{\"name\":\"x\",\"event\":\"result.produced\",\"targets\":[{\"type\":\"webhook\","
         "\"url\":\"https://his.example/\",\"secret\":\"short\"}]}", "secret"},
        {"{\"name\":\"x\",\"event\":\"result.produced\",\"targets\":[{\"type\":\"lake\","
         "\"prefix\":\"a/../b\"}]}", "prefix"},
        {"{\"name\":\"x\",\"event\":\"result.produced\",\"targets\":[{\"type\":\"mail\"}]}",
         "unknown type"},
        {"{\"name\":\"x\",\"event\":\"result.produced\",\"retries\":11,"
         "\"targets\":[{\"type\":\"shadow\"}]}", "retries"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(check(bad[i].doc, NULL, msg, sizeof msg), FM_EINVAL);
        if (!strstr(msg, bad[i].why))
            fail_msg("case %zu: '%s' does not say '%s'", i, msg, bad[i].why);
    }
    /* Plain http only to loopback (a receiver on the same host), and only
     * when allowed. */
    json_t *lb = J("{\"name\":\"x\",\"event\":\"device.online\",\"targets\":["
                   "{\"type\":\"webhook\",\"url\":\"http://127.0.0.1:9/h\","
                   "\"secret\":\"0123456789abcdef\"}]}");
    json_t *o = NULL;
    fm_errbuf e2 = {0};
    assert_int_equal(fm_rule_check(lb, 0, &o, &e2), FM_EINVAL);
    assert_null(o);
    json_decref(lb);
    assert_int_equal(check("{\"name\":\"x\",\"event\":\"device.online\",\"targets\":["
                           "{\"type\":\"webhook\",\"url\":\"http://127.0.0.1:9/h\","
                           "\"secret\":\"0123456789abcdef\"}]}",
                           NULL, msg, sizeof msg),
                     0);
}

static void test_rule_programs(void **state)
{
    (void)state;
    json_t *rule = NULL;
    char msg[600];
    assert_int_equal(check("{\"name\":\"x\",\"event\":\"result.produced\","
                           "\"filter\":\".data.outputs.hct < 30\","
                           "\"transform\":\".data.outputs.hct, .id\","
                           "\"targets\":[{\"type\":\"shadow\"}]}",
                           &rule, msg, sizeof msg),
                     0);
    fm_rule_prog *p = NULL;
    fm_errbuf err = {0};
    assert_int_equal(fm_rule_prog_compile(rule, &p, &err), 0);
    json_t *low = J("{\"id\":\"result.produced:7\",\"data\":{\"outputs\":{\"hct\":25.5}}}");
    json_t *high = J("{\"id\":\"result.produced:8\",\"data\":{\"outputs\":{\"hct\":45}}}");
    json_t *out = NULL;
    assert_int_equal(fm_rule_prog_run(p, low, &out, &err), 0);
    assert_int_equal(json_array_size(out), 2); /* two outputs of the transform */
    assert_true(json_real_value(json_array_get(out, 0)) == 25.5);
    assert_string_equal(json_string_value(json_array_get(out, 1)), "result.produced:7");
    json_decref(out);
    assert_int_equal(fm_rule_prog_run(p, high, &out, &err), 0);
    assert_int_equal(json_array_size(out), 0); /* filtered out */
    json_decref(out);
    /* A runtime error is an error, with jq's message. */
    json_t *odd = J("{\"id\":\"x\",\"data\":{\"outputs\":{\"hct\":{\"a\":1}}}}");
    json_decref(odd);
    odd = J("{\"id\":\"x\",\"data\":{\"outputs\":\"text\"}}");
    assert_int_equal(fm_rule_prog_run(p, odd, &out, &err), FM_EINVAL);
    assert_non_null(strstr(err.msg, "filter"));
    json_decref(odd);
    fm_rule_prog_free(p);
    json_decref(rule);

    /* No filter, no transform: the event itself. */
    assert_int_equal(check("{\"name\":\"y\",\"event\":\"device.online\","
                           "\"targets\":[{\"type\":\"shadow\"}]}",
                           &rule, msg, sizeof msg),
                     0);
    assert_int_equal(fm_rule_prog_compile(rule, &p, &err), 0);
    assert_int_equal(fm_rule_prog_run(p, high, &out, &err), 0);
    assert_int_equal(json_array_size(out), 1);
    assert_true(json_equal(json_array_get(out, 0), high));
    json_decref(out);
    fm_rule_prog_free(p);
    json_decref(rule);
    json_decref(low);
    json_decref(high);
}

static const char *sget(json_t *o, const char *path)
{
    char buf[128];
    snprintf(buf, sizeof buf, "%s", path);
    json_t *cur = o;
    for (char *save = NULL, *k = strtok_r(buf, ".", &save); k; k = strtok_r(NULL, ".", &save))
        cur = json_object_get(cur, k);
    return json_string_value(cur);
}

static void test_events(void **state)
{
    (void)state;
    fm_record rec = {.seq = 42, .device_id = "icu-1", .tenant = "t1", .measurement_id = "m-1",
                     .received_ms = 1796000000000, .taken_ms = 1795999999000,
                     .payload = "{\"id\":\"m-1\"}", .payload_len = 12,
                     .result_json = "{\"id\":\"m-1\",\"status\":\"ok\",\"model\":\"v@1\","
                                    "\"outputs\":{\"hematocrit_pct\":44.5}}",
                     .model = "v@1"};
    json_t *e = fm_event_from_record(FM_EV_RESULT_PRODUCED, &rec);
    assert_non_null(e);
    assert_string_equal(sget(e, "specversion"), FM_EVENTS_VERSION);
    assert_string_equal(sget(e, "id"), "result.produced:42");
    assert_string_equal(sget(e, "type"), "result.produced");
    assert_string_equal(sget(e, "tenant"), "t1");
    assert_string_equal(sget(e, "subject"), "devices/icu-1/measurements/m-1");
    assert_string_equal(sget(e, "data.status"), "ok");
    assert_string_equal(sget(e, "data.model"), "v@1");
    assert_true(json_real_value(json_object_get(
                    json_object_get(json_object_get(e, "data"), "outputs"), "hematocrit_pct")) ==
                44.5);
    /* The same row, the same document: what lets consumers drop repeats. */
    json_t *again = fm_event_from_record(FM_EV_RESULT_PRODUCED, &rec);
    assert_true(json_equal(e, again));
    json_decref(again);
    json_decref(e);
    e = fm_event_from_record(FM_EV_MEASUREMENT_STORED, &rec);
    assert_string_equal(sget(e, "id"), "measurement.stored:42");
    assert_string_equal(sget(e, "data.measurement.id"), "m-1");
    json_decref(e);
    rec.result_json = NULL;
    assert_null(fm_event_from_record(FM_EV_RESULT_PRODUCED, &rec));

    fm_label l = {.seq = 9, .device_id = "icu-1", .tenant = "t1", .measurement_id = "m-1",
                  .outputs_json = "{\"hematocrit_pct\":41}", .source = "lab",
                  .labelled_by = "alice", .at_ms = 1796000000000};
    e = fm_event_from_label(&l);
    assert_string_equal(sget(e, "id"), "label.written:9");
    assert_string_equal(sget(e, "data.labelled_by"), "alice");
    json_decref(e);

    fm_presence_change c = {.rev = 5, .device_id = "icu-1", .tenant = "t1", .online = 0,
                            .changed_ms = 1796000000000};
    e = fm_event_from_presence(&c);
    assert_string_equal(sget(e, "id"), "device.offline:5");
    assert_string_equal(sget(e, "subject"), "devices/icu-1");
    assert_true(json_is_false(json_object_get(json_object_get(e, "data"), "online")));
    json_decref(e);

    fm_device d = {.id = "icu-1", .tenant = "t1", .device_group = "icu"};
    e = fm_event_from_revocation(&d, 1796000000000);
    assert_string_equal(sget(e, "id"), "device.revoked:icu-1");
    json_decref(e);

    fm_device pd = {.id = "icu-2", .tenant = "t1", .device_group = "icu", .serial_number = "SN-9"};
    e = fm_event_from_provisioning(&pd, 77, 1796000000000);
    assert_string_equal(sget(e, "id"), "device.provisioned:77");
    assert_string_equal(sget(e, "data.serial_number"), "SN-9");
    json_decref(e);
    fm_model_alias al = {.tenant = "t1", .name = "viscosity", .alias = "canary", .version = "",
                         .share_pct = 0, .updated_by = "sci", .updated_ms = 1796000000000};
    e = fm_event_from_alias(&al, 12);
    assert_string_equal(sget(e, "id"), "model.deployed:12");
    assert_string_equal(sget(e, "subject"), "models/viscosity/aliases/canary");
    assert_true(json_is_null(json_object_get(json_object_get(e, "data"), "version")));
    json_decref(e);
    assert_string_equal(fm_event_source_name(fm_event_type_source(FM_EV_MODEL_DEPLOYED)), "aliases");

    fm_audit au = {.seq = 31, .at_ms = 1796000000000, .tenant = "t1", .actor = "fleetml",
                   .action = "drift.alert", .target = "viscosity@1.0.0", .outcome = "ok",
                   .details_json = "{\"psi\":0.4,\"feature\":\"noise_rel\"}"};
    e = fm_event_from_audit(&au);
    assert_string_equal(sget(e, "id"), "drift.alert:31");
    assert_string_equal(sget(e, "data.model"), "viscosity@1.0.0");
    assert_string_equal(sget(e, "data.feature"), "noise_rel");
    assert_string_equal(sget(e, "subject"), "models/viscosity@1.0.0");
    json_decref(e);
    au.action = "device.revoke";
    assert_null(fm_event_from_audit(&au));

    fm_lake_object lo = {.seq = 5, .tenant = "t1", .area = "raw",
                         .key = "raw/tenant=t1/date=2026-12-04/hour=09/n1-000000000007.ndjson.gz",
                         .rows = 12, .at_ms = 1796000000000};
    e = fm_event_from_lake_object(&lo);
    assert_string_equal(sget(e, "id"), "lake.object.created:5");
    assert_string_equal(sget(e, "type"), "lake.object.created");
    assert_string_equal(sget(e, "subject"),
                        "lake/raw/tenant=t1/date=2026-12-04/hour=09/n1-000000000007.ndjson.gz");
    assert_string_equal(sget(e, "data.area"), "raw");
    assert_int_equal(json_integer_value(json_object_get(json_object_get(e, "data"), "rows")), 12);
    json_decref(e);
    lo.rows = -1;
    e = fm_event_from_lake_object(&lo);
    assert_true(json_is_null(json_object_get(json_object_get(e, "data"), "rows")));
    json_decref(e);
    assert_string_equal(fm_event_source_name(fm_event_type_source(FM_EV_LAKE_OBJECT_CREATED)),
                        "lake");

    for (int t = 0; t < FM_EV__COUNT; t++)
        assert_int_equal(fm_event_type_parse(fm_event_type_name(t)), t);
    assert_int_equal(fm_event_type_parse("nope"), -1);
}

/* ---- with a store ---------------------------------------------------------------- */

typedef struct fx {
    char dir[64];
    fm_config cfg;
    fm_store *st;
} fx;

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static int setup(void **state)
{
    fx *f = calloc(1, sizeof *f);
    snprintf(f->dir, sizeof f->dir, "/tmp/fm-rules-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    assert_int_equal(fm_config_defaults(&f->cfg, f->dir), 0);
    assert_int_equal(test_store_backend(&f->cfg), 0);
    snprintf(f->cfg.node_id, sizeof f->cfg.node_id, "n1");
    fm_errbuf err;
    if (fm_store_open(&f->cfg, &f->st, &err) != 0)
        fail_msg("store open: %s", err.msg);
    assert_int_equal(fm_store_tenant_ensure(f->st, "t1", &err), 0);
    assert_int_equal(fm_store_tenant_ensure(f->st, "t2", &err), 0);
    fm_device d = {.id = "dev-1", .tenant = "t1", .status = FM_DEVICE_ACTIVE};
    assert_int_equal(fm_store_device_add(f->st, &d, &err), 0);
    fm_device d2 = {.id = "dev-2", .tenant = "t2", .status = FM_DEVICE_ACTIVE};
    assert_int_equal(fm_store_device_add(f->st, &d2, &err), 0);
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

typedef struct rows {
    int n;
    char names[8][32];
    int64_t pos[8];
    char spec[8][256];
} rows;

static int on_row(void *ud, const fm_rule_row *r)
{
    rows *a = ud;
    if (a->n < 8) {
        snprintf(a->names[a->n], sizeof a->names[0], "%s/%s", r->tenant, r->name);
        a->pos[a->n] = r->position;
        snprintf(a->spec[a->n], sizeof a->spec[0], "%s", r->spec_json);
    }
    a->n++;
    return 0;
}

typedef struct logs {
    int n;
    char outcome[8][24];
    int64_t seq[8];
} logs;

static int on_log(void *ud, const fm_rule_log *l)
{
    logs *a = ud;
    if (a->n < 8) {
        snprintf(a->outcome[a->n], sizeof a->outcome[0], "%s", l->outcome);
        a->seq[a->n] = l->seq;
    }
    a->n++;
    return 0;
}

static void test_rule_store(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    int created = -1;
    fm_rule_row r = {.tenant = "t1", .name = "a", .spec_json = "{\"v\":1}", .position = 7,
                     .updated_by = "alice"};
    assert_int_equal(fm_store_rule_put(f->st, &r, &created, &err), 0);
    assert_int_equal(created, 1);
    /* Replaced: the document changes, the position stays. */
    r.spec_json = "{\"v\":2}";
    r.position = 100;
    assert_int_equal(fm_store_rule_put(f->st, &r, &created, &err), 0);
    assert_int_equal(created, 0);
    fm_rule_row r2 = {.tenant = "t2", .name = "a", .spec_json = "{}", .position = 1,
                      .updated_by = "bob"};
    assert_int_equal(fm_store_rule_put(f->st, &r2, NULL, &err), 0);
    rows a = {0};
    assert_int_equal(fm_store_rule_list(f->st, "t1", NULL, on_row, &a), 0);
    assert_int_equal(a.n, 1);
    assert_string_equal(a.names[0], "t1/a");
    assert_int_equal(a.pos[0], 7);
    assert_string_equal(a.spec[0], "{\"v\":2}");
    memset(&a, 0, sizeof a);
    assert_int_equal(fm_store_rule_list(f->st, NULL, NULL, on_row, &a), 0);
    assert_int_equal(a.n, 2);
    assert_string_equal(a.names[1], "t2/a");
    assert_int_equal(fm_store_rule_position(f->st, "t1", "a", 55, &err), 0);
    memset(&a, 0, sizeof a);
    assert_int_equal(fm_store_rule_list(f->st, "t1", "a", on_row, &a), 0);
    assert_int_equal(a.pos[0], 55);
    assert_int_equal(fm_store_rule_position(f->st, "t1", "nope", 1, &err), FM_ENOTFOUND);

    for (int i = 0; i < 3; i++) {
        fm_rule_log l = {.tenant = "t1", .rule = "a", .event_id = "e", .target = "webhook",
                         .outcome = i == 2 ? "ok" : "failed", .attempt = i + 1};
        assert_int_equal(fm_store_rule_log_add(f->st, &l, &err), 0);
        assert_true(l.seq > 0 && l.at_ms > 0);
    }
    logs g = {0};
    assert_int_equal(fm_store_rule_log_page(f->st, "t1", "a", 0, 2, on_log, &g), 0);
    assert_int_equal(g.n, 2);
    assert_string_equal(g.outcome[0], "ok"); /* newest first */
    logs g2 = {0};
    assert_int_equal(fm_store_rule_log_page(f->st, "t1", "a", g.seq[1], 10, on_log, &g2), 0);
    assert_int_equal(g2.n, 1);
    assert_string_equal(g2.outcome[0], "failed");
    /* Deleted with its log; another tenant's rule of the same name stays. */
    assert_int_equal(fm_store_rule_delete(f->st, "t1", "a", &err), 0);
    assert_int_equal(fm_store_rule_delete(f->st, "t1", "a", &err), FM_ENOTFOUND);
    logs g3 = {0};
    assert_int_equal(fm_store_rule_log_page(f->st, "t1", "a", 0, 10, on_log, &g3), 0);
    assert_int_equal(g3.n, 0);
    memset(&a, 0, sizeof a);
    assert_int_equal(fm_store_rule_list(f->st, NULL, NULL, on_row, &a), 0);
    assert_int_equal(a.n, 1);
}

/* Waits (polling every 20 ms, at most 20 s) until dir/<area> holds n
 * files; returns how many it holds then. */
static int files_in(const char *root)
{
    int n = 0;
    DIR *d = opendir(root);
    for (struct dirent *e; d && (e = readdir(d)) != NULL;) {
        if (e->d_name[0] == '.')
            continue;
        char p[4400];
        snprintf(p, sizeof p, "%s/%s", root, e->d_name);
        struct stat st;
        if (stat(p, &st) == 0)
            n += S_ISDIR(st.st_mode) ? files_in(p) : 1;
    }
    if (d)
        closedir(d);
    return n;
}

static int wait_files(const char *root, int n)
{
    int got = 0;
    for (int i = 0; i < 1000 && (got = files_in(root)) < n; i++) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return got;
}

static void put_rule(fx *f, const char *tenant, const char *text)
{
    json_t *doc = J(text), *rule = NULL;
    fm_errbuf err = {0};
    if (fm_rule_check(doc, 0, &rule, &err) != 0)
        fail_msg("rule: %s", err.msg);
    int64_t pos = 0;
    int type = fm_event_type_parse(json_string_value(json_object_get(rule, "event")));
    assert_int_equal(fm_rules_source_position(f->st, type, &pos), 0);
    char *spec = json_dumps(rule, JSON_COMPACT);
    fm_rule_row r = {.tenant = tenant, .name = json_string_value(json_object_get(rule, "name")),
                     .spec_json = spec, .position = pos, .updated_by = "test"};
    assert_int_equal(fm_store_rule_put(f->st, &r, NULL, &err), 0);
    free(spec);
    json_decref(rule);
    json_decref(doc);
}

static void commit(fx *f, const char *dev, const char *tenant, const char *mid, double hct)
{
    char result[160];
    snprintf(result, sizeof result,
             "{\"id\":\"%s\",\"status\":\"ok\",\"model\":\"v@1\",\"outputs\":"
             "{\"hematocrit_pct\":%.1f}}",
             mid, hct);
    fm_record r = {.device_id = dev, .tenant = tenant, .measurement_id = mid,
                   .received_ms = 1796000000000, .taken_ms = 1796000000000,
                   .payload = "{}", .payload_len = 2, .result_json = result, .model = "v@1"};
    fm_errbuf err;
    assert_int_equal(fm_store_commit(f->st, &r, 1, NULL, 0, &err), 0);
}

static void test_engine(void **state)
{
    fx *f = *state;
    fm_errbuf err = {0};
    /* Committed before the rule exists: not the rule's. */
    commit(f, "dev-1", "t1", "m-0", 20.0);
    put_rule(f, "t1",
             "{\"name\":\"low\",\"event\":\"result.produced\","
             "\"filter\":\".data.outputs.hematocrit_pct < 30\","
             "\"transform\":\"{m: .data.measurement_id}\","
             "\"targets\":[{\"type\":\"lake\",\"prefix\":\"alerts\"}]}");
    /* A function this node does not have: fails, and with no retries is
     * dead-lettered at once; the rule then goes on. */
    put_rule(f, "t1",
             "{\"name\":\"nofn\",\"event\":\"result.produced\",\"retries\":1,"
             "\"targets\":[{\"type\":\"function\",\"function\":\"missing\"}]}");
    /* Model events come from the audit log: a training job's final state
     * writes its entry in the same transaction. */
    put_rule(f, "t1",
             "{\"name\":\"trained\",\"event\":\"training.finished\","
             "\"targets\":[{\"type\":\"lake\",\"prefix\":\"trained\"}]}");
    /* Lake objects: from the log the export's cursor settles with. */
    put_rule(f, "t1",
             "{\"name\":\"objs\",\"event\":\"lake.object.created\","
             "\"filter\":\".data.area == \\\"raw\\\"\","
             "\"targets\":[{\"type\":\"lake\",\"prefix\":\"objs\"}]}");
    fm_lake *lake = NULL;
    assert_int_equal(fm_lake_open(&f->cfg, &lake, &err), 0);
    fm_rules *e = NULL;
    fm_rules_opts o = {.cfg = &f->cfg, .lake = lake, .poll_ms = 20, .retry_base_ms = 50};
    assert_int_equal(fm_rules_start(&o, &e, &err), 0);
    commit(f, "dev-1", "t1", "m-1", 25.0); /* low: delivered */
    commit(f, "dev-1", "t1", "m-2", 45.0); /* normal: filtered out */
    commit(f, "dev-2", "t2", "m-3", 10.0); /* another tenant: not this rule's */
    commit(f, "dev-1", "t1", "m-4", 28.0); /* low */
    fm_train_job job = {.from_ms = 0, .to_ms = 1};
    snprintf(job.tenant, sizeof job.tenant, "t1");
    snprintf(job.node, sizeof job.node, "n1");
    snprintf(job.status, sizeof job.status, "queued");
    snprintf(job.version, sizeof job.version, "2.0.0");
    assert_int_equal(f->st->models->job_add(f->st, &job, &err), 0);
    /* Taken (running: not final, no event), then done. */
    assert_int_equal(f->st->models->job_take(f->st, "n1", 1796000000000, &job), 0);
    assert_string_equal(job.status, "running");
    snprintf(job.status, sizeof job.status, "done");
    job.rows = 42;
    assert_int_equal(f->st->models->job_update(f->st, &job, &err), 0);
    /* A job its node's restart interrupted ends failed, with its event. */
    fm_train_job job2 = job;
    snprintf(job2.version, sizeof job2.version, "2.0.1");
    assert_int_equal(f->st->models->job_add(f->st, &job2, &err), 0);
    assert_int_equal(f->st->models->job_take(f->st, "n1", 1796000000000, &job2), 0);
    assert_int_equal(f->st->models->job_fail_running(f->st, "n1", 1796000000001, &err), 0);
    fm_train_job got2;
    assert_int_equal(f->st->models->job_get(f->st, job2.id, &got2), 0);
    assert_string_equal(got2.status, "failed");
    assert_non_null(strstr(got2.error, "interrupted"));
    fm_lake_cursor lc = {.last_seq = 4};
    fm_lake_object lo[3] = {{.tenant = "t1", .area = "raw", .key = "raw/tenant=t1/x", .rows = 3},
                            {.tenant = "t2", .area = "raw", .key = "raw/tenant=t2/y", .rows = 1},
                            {.tenant = "t1", .area = "labels", .key = "labels/z", .rows = 1}};
    assert_int_equal(fm_store_lake_settle(f->st, "cluster", FM_STREAM_RAW, &lc, lo, 3, &err), 0);
    char alerts[4200], dead[4200];
    snprintf(alerts, sizeof alerts, "%s/alerts/tenant=t1", f->cfg.lake_dir);
    snprintf(dead, sizeof dead, "%s/dead-letter/rule=nofn/tenant=t1", f->cfg.lake_dir);
    assert_int_equal(wait_files(alerts, 2), 2);
    char trained[4200];
    snprintf(trained, sizeof trained, "%s/trained/tenant=t1", f->cfg.lake_dir);
    assert_int_equal(wait_files(trained, 2), 2);
    char objs[4200];
    snprintf(objs, sizeof objs, "%s/objs/tenant=t1", f->cfg.lake_dir);
    assert_int_equal(wait_files(objs, 1), 1);
    /* Three results of t1 reached the failing rule: three dead letters. */
    assert_int_equal(wait_files(dead, 3), 3);
    fm_rules_stop(e);
    /* Nothing more came: exactly the two low ones, and no other tenant's. */
    assert_int_equal(files_in(alerts), 2);
    assert_int_equal(files_in(trained), 2); /* the running states gave none */
    assert_int_equal(files_in(objs), 1);     /* t1's raw object only */
    snprintf(objs, sizeof objs, "%s/objs/tenant=t2", f->cfg.lake_dir);
    assert_int_equal(files_in(objs), 0);
    char t2[4200];
    snprintf(t2, sizeof t2, "%s/alerts/tenant=t2", f->cfg.lake_dir);
    assert_int_equal(files_in(t2), 0);
    /* Positions were stored: a new engine starts where this one stopped. */
    rows a = {0};
    assert_int_equal(fm_store_rule_list(f->st, "t1", "low", on_row, &a), 0);
    int64_t max = 0;
    assert_int_equal(fm_store_max_seq(f->st, FM_STREAM_RAW, &max), 0);
    assert_int_equal(a.pos[0], max);
    /* The log: a failure, a retry's failure and the dead letter, per event. */
    logs g = {0};
    assert_int_equal(fm_store_rule_log_page(f->st, "t1", "nofn", 0, 8, on_log, &g), 0);
    assert_true(g.n >= 3);
    assert_string_equal(g.outcome[0], "dead-lettered");
    fm_lake_close(lake);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rule_check),
        cmocka_unit_test(test_rule_programs),
        cmocka_unit_test(test_events),
        cmocka_unit_test_setup_teardown(test_rule_store, setup, teardown),
        cmocka_unit_test_setup_teardown(test_engine, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
