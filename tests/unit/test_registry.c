/*
 * Registry unit tests: shadow merge/delta semantics, device id derivation,
 * pre-provisioning hooks run as executables, topic routing, and the
 * registry tables of the SQLite store (templates, provisioning commits,
 * rotation grace, revocation, event log).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "store_backend.h"

#include <cmocka.h>

#include "fleetml/registry.h"
#include "fleetml/store.h"

#include <ftw.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static json_t *J(const char *text)
{
    json_t *j = json_loads(text, 0, NULL);
    assert_non_null(j);
    return j;
}

static void assert_json(json_t *got, const char *want)
{
    json_t *w = J(want);
    if (!json_equal(got, w)) {
        char *g = json_dumps(got, JSON_COMPACT | JSON_SORT_KEYS);
        fail_msg("got %s, want %s", g, want);
    }
    json_decref(w);
}

static void test_shadow_merge(void **state)
{
    (void)state;
    json_t *doc = J("{\"a\":1,\"b\":{\"x\":1,\"y\":2},\"c\":[1,2]}");
    json_t *patch = J("{\"a\":null,\"b\":{\"y\":null,\"z\":3},\"c\":[3],\"d\":{\"k\":null,\"m\":1}}");
    assert_int_equal(fm_shadow_merge(doc, patch), 0);
    assert_json(doc, "{\"b\":{\"x\":1,\"z\":3},\"c\":[3],\"d\":{\"m\":1}}");
    json_decref(doc);
    json_decref(patch);
}

static void test_shadow_delta(void **state)
{
    (void)state;
    json_t *des = J("{\"led\":\"on\",\"rate\":5,\"cfg\":{\"a\":1,\"b\":2},\"same\":true}");
    json_t *rep = J("{\"led\":\"off\",\"cfg\":{\"a\":1,\"b\":3},\"same\":true,\"extra\":1}");
    json_t *d = fm_shadow_delta(des, rep);
    assert_json(d, "{\"led\":\"on\",\"rate\":5,\"cfg\":{\"b\":2}}");
    json_decref(d);
    json_t *in_sync = fm_shadow_delta(rep, rep);
    assert_int_equal(json_object_size(in_sync), 0);
    json_decref(in_sync);
    json_decref(des);
    json_decref(rep);
}

static void test_device_id(void **state)
{
    (void)state;
    char id[65];
    assert_int_equal(fm_registry_device_id("visc", "SN-00_1a", id, sizeof id), 0);
    assert_string_equal(id, "visc-sn-00-1a");
    char longserial[200];
    memset(longserial, 'a', sizeof longserial - 1);
    longserial[sizeof longserial - 1] = '\0';
    assert_int_equal(fm_registry_device_id("p", longserial, id, sizeof id), 0);
    assert_int_equal(strlen(id), 64);
    assert_int_equal(fm_registry_device_id("Bad", "x", id, sizeof id), FM_EINVAL);
}

static void test_topic_routing(void **state)
{
    (void)state;
    assert_true(fm_registry_handles("fleet/provisioning/prov-1/request"));
    assert_false(fm_registry_handles("fleet/provisioning/prov-1/accepted"));
    assert_true(fm_registry_handles("fleet/dev-1/cert/rotate"));
    assert_true(fm_registry_handles("fleet/dev-1/shadow/update"));
    assert_true(fm_registry_handles("fleet/dev-1/shadow/get"));
    assert_false(fm_registry_handles("fleet/dev-1/shadow/delta"));
    assert_false(fm_registry_handles("fleet/dev-1/measurements"));
    assert_false(fm_registry_handles("other/dev-1/shadow/get"));
}

static void write_script(const char *path, const char *body)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(body, f);
    fclose(f);
    assert_int_equal(chmod(path, 0700), 0);
}

static void test_hook_exec(void **state)
{
    (void)state;
    char dir[] = "/tmp/fm-hook-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char ok[64], bad[64], slow[64], fail[64];
    snprintf(ok, sizeof ok, "%s/ok", dir);
    snprintf(bad, sizeof bad, "%s/bad", dir);
    snprintf(slow, sizeof slow, "%s/slow", dir);
    snprintf(fail, sizeof fail, "%s/fail", dir);
    /* Echoes the serial back in the answer, so the request really went in. */
    write_script(ok, "#!/bin/sh\nread line\nserial=$(echo \"$line\" | sed 's/.*\"serial\":\"\\([^\"]*\\)\".*/\\1/')\n"
                     "echo \"{\\\"allow\\\": false, \\\"reason\\\": \\\"no $serial\\\"}\"\n");
    write_script(bad, "#!/bin/sh\necho not json\n");
    write_script(slow, "#!/bin/sh\nexec sleep 5\n");
    write_script(fail, "#!/bin/sh\nexit 3\n");
    json_t *req = J("{\"serial\":\"SN42\"}");
    json_t *resp = NULL;
    fm_errbuf err;
    assert_int_equal(fm_registry_run_hook(ok, req, 2000, &resp, &err), 0);
    assert_false(json_is_true(json_object_get(resp, "allow")));
    assert_string_equal(json_string_value(json_object_get(resp, "reason")), "no SN42");
    json_decref(resp);
    assert_int_equal(fm_registry_run_hook(bad, req, 2000, &resp, &err), FM_EPROTO);
    assert_int_equal(fm_registry_run_hook(slow, req, 200, &resp, &err), FM_ETIMEDOUT);
    assert_int_equal(fm_registry_run_hook(fail, req, 2000, &resp, &err), FM_EIO);
    assert_int_equal(fm_registry_run_hook("relative/path", req, 200, &resp, &err), FM_EINVAL);
    /* A fixed-policy hook that never reads its request: whether it has
     * exited before the request is written is a race the caller must not
     * see. Its answer decides every time. */
    char deaf[64];
    snprintf(deaf, sizeof deaf, "%s/deaf", dir);
    write_script(deaf, "#!/bin/sh\nexec 0<&-\necho '{\"allow\": true}'\n");
    for (int i = 0; i < 40; i++) {
        resp = NULL;
        assert_int_equal(fm_registry_run_hook(deaf, req, 2000, &resp, &err), 0);
        assert_true(json_is_true(json_object_get(resp, "allow")));
        json_decref(resp);
        /* The same race on a hook that answers garbage: still a protocol
         * error, never an I/O error. */
        assert_int_equal(fm_registry_run_hook(bad, req, 2000, &resp, &err), FM_EPROTO);
    }
    remove(deaf);
    json_decref(req);
    remove(ok);
    remove(bad);
    remove(slow);
    remove(fail);
    rmdir(dir);
}

/* ---- store registry tables ------------------------------------------------ */

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
    snprintf(f->dir, sizeof f->dir, "/tmp/fm-reg-XXXXXX");
    assert_non_null(mkdtemp(f->dir));
    fm_config_defaults(&f->cfg, f->dir);
    assert_int_equal(test_store_backend(&f->cfg), 0);
    fm_errbuf err;
    assert_int_equal(fm_store_open(&f->cfg, &f->st, &err), 0);
    assert_int_equal(fm_store_tenant_ensure(f->st, "t1", &err), 0);
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

typedef struct acc {
    char items[16][64];
    int n;
} acc;

static int acc_serial(void *ud, const char *serial, int status, int64_t when)
{
    (void)status;
    (void)when;
    acc *a = ud;
    snprintf(a->items[a->n++], 64, "%s", serial);
    return 0;
}

static int acc_event(void *ud, int64_t seq, int kind, const char *subject)
{
    (void)seq;
    acc *a = ud;
    snprintf(a->items[a->n++], 64, "%d:%s", kind, subject);
    return 0;
}

static void test_templates(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    fm_template t = {.name = "tp", .tenant = "t1", .device_prefix = "tp", .cert_days = 10,
                     .rate_per_min = 5};
    const char *serials[] = {"A1", "B2"};
    assert_int_equal(fm_store_template_add(f->st, &t, serials, 2, &err), 0);
    assert_int_equal(fm_store_template_add(f->st, &t, NULL, 0, &err), FM_EEXIST);
    fm_template bad = t;
    snprintf(bad.name, sizeof bad.name, "other");
    snprintf(bad.tenant, sizeof bad.tenant, "nope");
    assert_int_equal(fm_store_template_add(f->st, &bad, NULL, 0, &err), FM_ENOTFOUND);
    assert_int_equal(fm_store_template_serial_allowed(f->st, "tp", "A1"), 1);
    assert_int_equal(fm_store_template_serial_allowed(f->st, "tp", "C3"), 0);
    fm_template open = t;
    snprintf(open.name, sizeof open.name, "open");
    assert_int_equal(fm_store_template_add(f->st, &open, NULL, 0, &err), 0);
    assert_int_equal(fm_store_template_serial_allowed(f->st, "open", "anything"), 1);
    assert_int_equal(fm_store_claim_cert_add(f->st, "tp", "abc1", &err), 0);
    assert_int_equal(fm_store_claim_cert_add(f->st, "nope", "abc2", &err), FM_ENOTFOUND);
    acc a = {0};
    assert_int_equal(fm_store_claim_certs(f->st, "tp", acc_serial, &a), 0);
    assert_int_equal(a.n, 1);
    assert_string_equal(a.items[0], "abc1");
    assert_int_equal(fm_store_template_set_status(f->st, "tp", FM_TEMPLATE_DISABLED, &err), 0);
    fm_template got;
    assert_int_equal(fm_store_template_get(f->st, "tp", &got), 0);
    assert_int_equal(got.status, FM_TEMPLATE_DISABLED);
    assert_int_equal(got.has_allowlist, 1);
    acc ev = {0};
    assert_int_equal(fm_store_events_after(f->st, 0, 100, acc_event, &ev), 0);
    assert_int_equal(ev.n, 4); /* add tp, add open, claim cert, disable */
    assert_string_equal(ev.items[3], "1:tp");
}

static fm_provision prov(const char *serial, const char *dev, const char *cert, int re)
{
    return (fm_provision){.template_name = "tp", .serial_number = serial, .device_id = dev,
                          .tenant = "t1", .device_group = "g", .model = "m", .firmware = "f",
                          .cert_serial = cert, .cert_pem = "PEM-" "x", .not_after_ms = 1,
                          .reprovision = re};
}

static void test_provisioning(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    fm_provision p = prov("SN1", "tp-sn1", "c1", 0);
    p.key_id = "key-a";
    char id[65];
    assert_int_equal(fm_store_key_owner(f->st, "key-a", id, sizeof id), FM_ENOTFOUND);
    assert_int_equal(fm_store_provision_commit(f->st, &p, &err), 0);
    assert_int_equal(fm_store_key_owner(f->st, "key-a", id, sizeof id), 0);
    assert_string_equal(id, "tp-sn1");
    assert_int_equal(fm_store_key_owner(f->st, "", id, sizeof id), FM_ENOTFOUND);
    char *pem = NULL;
    assert_int_equal(fm_store_provision_lookup(f->st, "SN1", id, sizeof id, &pem), 0);
    assert_string_equal(id, "tp-sn1");
    assert_string_equal(pem, "PEM-x");
    fm_free(pem);
    assert_int_equal(fm_store_provision_lookup(f->st, "SN9", id, sizeof id, &pem), FM_ENOTFOUND);
    /* a different serial cannot take over the id */
    fm_provision thief = prov("SN2", "tp-sn1", "c2", 0);
    assert_int_equal(fm_store_provision_commit(f->st, &thief, &err), FM_EEXIST);
    /* re-provisioning revokes the earlier certificate */
    fm_provision again = prov("SN1", "tp-sn1", "c3", 1);
    assert_int_equal(fm_store_provision_commit(f->st, &again, &err), 0);
    acc a = {0};
    assert_int_equal(fm_store_device_certs(f->st, "tp-sn1", acc_serial, &a), 0);
    assert_int_equal(a.n, 1);
    assert_string_equal(a.items[0], "c3");
    acc r = {0};
    assert_int_equal(fm_store_revoked_certs(f->st, acc_serial, &r), 0);
    assert_int_equal(r.n, 1);
    assert_string_equal(r.items[0], "c1");
    /* a revoked certificate no longer binds its key */
    assert_int_equal(fm_store_key_owner(f->st, "key-a", id, sizeof id), FM_ENOTFOUND);
    fm_device d;
    assert_int_equal(fm_store_device_get(f->st, "tp-sn1", &d), 0);
    assert_string_equal(d.serial_number, "SN1");
    assert_string_equal(d.device_group, "g");
}

static void test_rotation_and_revocation(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    fm_device d = {.id = "dev-1", .tenant = "t1", .cert_serial = "old1"};
    assert_int_equal(fm_store_device_add(f->st, &d, &err), 0);
    assert_int_equal(fm_store_rotate_commit(f->st, "dev-1", "new1", "P", "k-new1", 5, "old1", 1000, &err), 0);
    acc a = {0};
    assert_int_equal(fm_store_device_certs(f->st, "dev-1", acc_serial, &a), 0);
    assert_int_equal(a.n, 2); /* both valid during the grace period */
    long n = -1;
    assert_int_equal(fm_store_expire_grace(f->st, 999, &n, &err), 0);
    assert_int_equal(n, 0);
    assert_int_equal(fm_store_expire_grace(f->st, 1000, &n, &err), 0);
    assert_int_equal(n, 1);
    acc b = {0};
    assert_int_equal(fm_store_device_certs(f->st, "dev-1", acc_serial, &b), 0);
    assert_int_equal(b.n, 1);
    assert_string_equal(b.items[0], "new1");
    /* revocation is final */
    assert_int_equal(fm_store_device_revoke(f->st, "dev-1", &err), 0);
    acc c = {0};
    assert_int_equal(fm_store_device_certs(f->st, "dev-1", acc_serial, &c), 0);
    assert_int_equal(c.n, 0);
    assert_int_equal(fm_store_device_set_status(f->st, "dev-1", FM_DEVICE_ACTIVE, &err), FM_EPERM);
    assert_int_equal(fm_store_device_revoke(f->st, "nope", &err), FM_ENOTFOUND);
}

static void test_shadow_store(void **state)
{
    fx *f = *state;
    fm_errbuf err;
    fm_device d = {.id = "dev-s", .tenant = "t1"};
    assert_int_equal(fm_store_device_add(f->st, &d, &err), 0);
    fm_shadow sh;
    assert_int_equal(fm_store_shadow_get(f->st, "dev-s", &sh), 0);
    assert_int_equal(sh.version, 0);
    assert_string_equal(sh.desired, "{}");
    fm_shadow_clear(&sh);
    int64_t v = 0;
    assert_int_equal(fm_store_shadow_put(f->st, "dev-s", "{\"a\":1}", "{}", 0, &v, 1, &err), 0);
    assert_int_equal(v, 1);
    /* a stale writer loses */
    assert_int_equal(fm_store_shadow_put(f->st, "dev-s", "{}", "{}", 0, &v, 0, &err), FM_EBUSY);
    assert_int_equal(fm_store_shadow_put(f->st, "ghost", "{}", "{}", -1, &v, 0, &err),
                     FM_ENOTFOUND);
    assert_int_equal(fm_store_shadow_get(f->st, "dev-s", &sh), 0);
    assert_int_equal(sh.version, 1);
    assert_string_equal(sh.desired, "{\"a\":1}");
    fm_shadow_clear(&sh);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shadow_merge),
        cmocka_unit_test(test_shadow_delta),
        cmocka_unit_test(test_device_id),
        cmocka_unit_test(test_topic_routing),
        cmocka_unit_test(test_hook_exec),
        cmocka_unit_test_setup_teardown(test_templates, setup, teardown),
        cmocka_unit_test_setup_teardown(test_provisioning, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rotation_and_revocation, setup, teardown),
        cmocka_unit_test_setup_teardown(test_shadow_store, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
