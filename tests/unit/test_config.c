/*
 * Unit tests for the configuration module (src/core/config.c): defaults,
 * every key's setter, the INI parser's error paths with line numbers, and
 * the render -> parse round trip.
 */
#include "fleetml/config.h"
#include "fleetml/mqtt.h"

#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

static char tmpdir[PATH_MAX];

static int setup(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/fm-test-config-XXXXXX");
    if (!mkdtemp(tmpdir))
        return -1;
    /* Resolve symlinks (e.g. /tmp on macOS-like setups) so expectations
     * match what realpath() gives the code under test. */
    char real[PATH_MAX];
    if (!realpath(tmpdir, real))
        return -1;
    snprintf(tmpdir, sizeof tmpdir, "%s", real);
    unsetenv("FM_MODEL_DIR");
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static void defaults(fm_config *c)
{
    assert_int_equal(fm_config_defaults(c, tmpdir), 0);
}

/* ---- defaults ------------------------------------------------------------------- */

static void test_defaults(void **state)
{
    (void)state;
    fm_config c;
    assert_int_equal(fm_config_defaults(&c, NULL), 0);
    char cwd[PATH_MAX], want[PATH_MAX + 8];
    assert_non_null(getcwd(cwd, sizeof cwd));
    snprintf(want, sizeof want, "%s/var", strcmp(cwd, "/") == 0 ? "" : cwd);
    assert_string_equal(c.data_dir, want);
    snprintf(want, sizeof want, "%s/lake", c.data_dir);
    assert_string_equal(c.lake_dir, want);
    assert_int_equal(c.log_level, FM_LOG_INFO);
    assert_string_equal(c.broker_mode, "supervised");
    assert_string_equal(c.mosquitto_bin, "/usr/sbin/mosquitto");
    assert_string_equal(c.broker_bind, "0.0.0.0");
    assert_int_equal(c.broker_port, 8883);
    assert_int_equal(c.broker_service_port, 8884);
    assert_string_equal(c.broker_host, "127.0.0.1");
    assert_int_equal(c.max_payload, 131072);
    assert_string_equal(c.http_bind, "127.0.0.1");
    assert_int_equal(c.http_port, 8080);
    assert_int_equal(c.commit_window_us, 0);
    assert_int_equal(c.keep_warm_us, 2000);
    assert_int_equal(c.batch_max, 256);
    assert_int_equal(c.queue_max, 65536);
    assert_string_equal(c.store_backend, "sqlite");
    assert_string_equal(c.lake_backend, "fs");
    assert_int_equal(c.lake_roll_bytes, 8L * 1024 * 1024);
    assert_int_equal(c.lake_roll_seconds, 60);
    assert_string_equal(c.model_dir, "models/viscosity");

    /* The node id is derived from the host name but always usable. */
    assert_true(strlen(c.node_id) > 0);
    assert_true(strspn(c.node_id, "abcdefghijklmnopqrstuvwxyz0123456789-") == strlen(c.node_id));
    assert_true(c.node_id[0] != '-');

    /* Every default must be accepted by the setter: render and re-parse. */
    char *text;
    assert_int_equal(fm_config_render(&c, &text), 0);
    fm_config d;
    assert_int_equal(fm_config_defaults(&d, NULL), 0);
    fm_errbuf err;
    if (fm_config_parse(&d, text, &err) != 0)
        fail_msg("defaults do not re-parse: %s", err.msg);
    fm_free(text);
}

static void test_defaults_model_env(void **state)
{
    (void)state;
    fm_config c;
    setenv("FM_MODEL_DIR", "/opt/models/v7", 1);
    defaults(&c);
    assert_string_equal(c.model_dir, "/opt/models/v7");
    setenv("FM_MODEL_DIR", "", 1);
    defaults(&c);
    assert_string_equal(c.model_dir, "models/viscosity");
    unsetenv("FM_MODEL_DIR");
}

static void test_defaults_data_dir(void **state)
{
    (void)state;
    fm_config c;
    char in[PATH_MAX + 32], want[PATH_MAX + 32];

    /* An existing directory resolves fully (trailing slashes go). */
    snprintf(in, sizeof in, "%s/", tmpdir);
    assert_int_equal(fm_config_defaults(&c, in), 0);
    assert_string_equal(c.data_dir, tmpdir);

    /* A missing directory under an existing parent: parent resolved. */
    snprintf(in, sizeof in, "%s/sub/../new", tmpdir);
    char sub[PATH_MAX + 8];
    snprintf(sub, sizeof sub, "%s/sub", tmpdir);
    assert_int_equal(mkdir(sub, 0700), 0);
    assert_int_equal(fm_config_defaults(&c, in), 0);
    snprintf(want, sizeof want, "%s/new", tmpdir);
    assert_string_equal(c.data_dir, want);

    /* Nothing resolves: kept as given. */
    assert_int_equal(fm_config_defaults(&c, "/nonexistent-fm/a/b"), 0);
    assert_string_equal(c.data_dir, "/nonexistent-fm/a/b");
    assert_string_equal(c.lake_dir, "/nonexistent-fm/a/b/lake");

    /* The root directory. */
    assert_int_equal(fm_config_defaults(&c, "/"), 0);
    assert_string_equal(c.data_dir, "/");
    assert_string_equal(c.lake_dir, "/lake");

    /* Empty and over-long are refused. */
    assert_int_equal(fm_config_defaults(&c, ""), FM_EINVAL);
    char *big = malloc(PATH_MAX + 1);
    memset(big, 'a', PATH_MAX);
    big[PATH_MAX] = '\0';
    assert_int_equal(fm_config_defaults(&c, big), FM_EINVAL);
    free(big);
}

/* ---- set ------------------------------------------------------------------------ */

static void set_ok(fm_config *c, const char *key, const char *value)
{
    fm_errbuf err;
    if (fm_config_set(c, key, value, &err) != 0)
        fail_msg("set %s=%s failed: %s", key, value, err.msg);
}

static void test_set_every_key(void **state)
{
    (void)state;
    fm_config c;
    defaults(&c);
    set_ok(&c, "node.id", "ward-3");
    assert_string_equal(c.node_id, "ward-3");
    set_ok(&c, "node.log_level", "debug");
    assert_int_equal(c.log_level, FM_LOG_DEBUG);
    set_ok(&c, "node.log_level", "error");
    assert_int_equal(c.log_level, FM_LOG_ERROR);
    set_ok(&c, "broker.mode", "external");
    assert_string_equal(c.broker_mode, "external");
    set_ok(&c, "broker.mosquitto", "/opt/mosquitto 2/sbin/mosquitto");
    assert_string_equal(c.mosquitto_bin, "/opt/mosquitto 2/sbin/mosquitto");
    set_ok(&c, "broker.bind", "::");
    assert_string_equal(c.broker_bind, "::");
    set_ok(&c, "broker.port", "1");
    assert_int_equal(c.broker_port, 1);
    set_ok(&c, "broker.service_port", "65535");
    assert_int_equal(c.broker_service_port, 65535);
    set_ok(&c, "broker.host", "mqtt.example.org");
    assert_string_equal(c.broker_host, "mqtt.example.org");
    set_ok(&c, "broker.max_payload", "1024");
    assert_int_equal(c.max_payload, 1024);
    set_ok(&c, "http.bind", "0.0.0.0");
    assert_string_equal(c.http_bind, "0.0.0.0");
    set_ok(&c, "http.port", "+9090");
    assert_int_equal(c.http_port, 9090);
    set_ok(&c, "pipeline.commit_window_us", "0");
    assert_int_equal(c.commit_window_us, 0);
    set_ok(&c, "pipeline.commit_window_us", "2000");
    assert_int_equal(c.commit_window_us, 2000);
    set_ok(&c, "pipeline.keep_warm_us", "0");
    assert_int_equal(c.keep_warm_us, 0);
    set_ok(&c, "pipeline.batch_max", "4096");
    assert_int_equal(c.batch_max, 4096);
    set_ok(&c, "pipeline.queue_max", "1");
    assert_int_equal(c.queue_max, 1);
    set_ok(&c, "store.backend", "postgres");
    assert_string_equal(c.store_backend, "postgres");
    /* A postgres:// URI alone selects the backend. */
    fm_config u;
    assert_int_equal(fm_config_defaults(&u, "/tmp/x"), 0);
    set_ok(&u, "store.url", "postgresql://fleetml@db/fleetml");
    assert_string_equal(u.store_backend, "postgres");
    assert_int_equal(fm_config_defaults(&u, "/tmp/x"), 0);
    set_ok(&u, "store.url", "/not-a-uri");
    assert_string_equal(u.store_backend, "sqlite");
    set_ok(&c, "lake.backend", "s3");
    assert_string_equal(c.lake_backend, "s3");
    set_ok(&c, "lake.dir", "/srv/lake#1");
    assert_string_equal(c.lake_dir, "/srv/lake#1");
    set_ok(&c, "lake.dir", "");
    assert_string_equal(c.lake_dir, "");
    set_ok(&c, "lake.roll_bytes", "1073741824");
    assert_int_equal(c.lake_roll_bytes, 1073741824L);
    set_ok(&c, "lake.roll_bytes", "4096");
    assert_int_equal(c.lake_roll_bytes, 4096);
    set_ok(&c, "lake.roll_seconds", "3600");
    assert_int_equal(c.lake_roll_seconds, 3600);
    set_ok(&c, "model.dir", "models/v2");
    assert_string_equal(c.model_dir, "models/v2");
}

static void test_set_errors(void **state)
{
    (void)state;
    static const struct {
        const char *key, *value, *msg;
    } cases[] = {
        /* unknown keys */
        {"http.prot", "80", "unknown key 'http.prot' (did you mean 'http.port'?)"},
        {"broker.prot", "80", "did you mean 'broker.port'?"},
        {"nosuchkey", "1", "unknown key 'nosuchkey'"},
        {"zzz.yyyyyy", "1", "unknown key 'zzz.yyyyyy'"},
        {"http.", "1", "unknown key 'http.'"},
        {".port", "1", "unknown key '.port'"},
        {"HTTP.port", "1", "unknown key 'HTTP.port'"},
        /* integers */
        {"http.port", "abc", "http.port: 'abc' is not an integer"},
        {"http.port", "", "http.port: '' is not an integer"},
        {"http.port", "80x", "is not an integer"},
        {"http.port", " 80", "is not an integer"},
        {"http.port", "80 ", "is not an integer"},
        {"http.port", "0x50", "is not an integer"},
        {"http.port", "8.0", "is not an integer"},
        {"http.port", "-", "is not an integer"},
        {"http.port", "0", "http.port: 0 is outside 1..65535"},
        {"http.port", "65536", "http.port: 65536 is outside 1..65535"},
        {"http.port", "-1", "is outside 1..65535"},
        {"http.port", "99999999999999999999999", "is outside 1..65535"},
        {"broker.port", "0", "broker.port: 0 is outside"},
        {"broker.service_port", "70000", "broker.service_port: 70000 is outside"},
        {"broker.max_payload", "1023", "broker.max_payload: 1023 is outside 1024..16777216"},
        {"pipeline.commit_window_us", "2001", "pipeline.commit_window_us: 2001 is outside 0..2000"},
        {"pipeline.keep_warm_us", "-1", "pipeline.keep_warm_us: -1 is outside 0..1000000"},
        {"pipeline.commit_window_us", "-1", "is outside 0..2000"},
        {"pipeline.batch_max", "0", "pipeline.batch_max: 0 is outside 1..4096"},
        {"pipeline.batch_max", "4097", "is outside 1..4096"},
        {"pipeline.queue_max", "0", "pipeline.queue_max: 0 is outside"},
        {"lake.roll_bytes", "4095", "lake.roll_bytes: 4095 is outside 4096..1073741824"},
        {"lake.roll_bytes", "8M", "is not an integer"},
        {"lake.roll_seconds", "0", "lake.roll_seconds: 0 is outside 1..3600"},
        {"lake.roll_seconds", "3601", "is outside 1..3600"},
        /* enums */
        {"broker.mode", "embedded", "broker.mode: 'embedded' is not one of supervised, external"},
        {"broker.mode", "Supervised", "is not one of"},
        {"store.backend", "mysql", "store.backend: 'mysql' is not one of sqlite, postgres"},
        {"lake.backend", "gcs", "lake.backend: 'gcs' is not one of fs, s3"},
        {"node.log_level", "verbose", "node.log_level: 'verbose' is not one of debug"},
        {"node.log_level", "", "is not one of"},
        /* node id */
        {"node.id", "Node1", "node.id: 'Node1' must be [a-z0-9]"},
        {"node.id", "-node", "must be [a-z0-9]"},
        {"node.id", "a_b", "must be [a-z0-9]"},
        {"node.id", "a b", "must not contain spaces"},
        {"node.id", "", "node.id: must not be empty"},
        {"node.id", "0123456789012345678901234567890123456789012345678901234567890123",
         "node.id: value is 64 bytes, longer than the limit of 63"},
        /* hosts and paths */
        {"broker.bind", "", "broker.bind: must not be empty"},
        {"broker.bind", "0.0.0.0 ", "broker.bind: leading or trailing white space"},
        {"broker.host", "a b", "broker.host: 'a b' must not contain spaces"},
        {"http.bind", "a\tb", "http.bind: control character at offset 1"},
        {"broker.mosquitto", "", "broker.mosquitto: must not be empty"},
        {"model.dir", " models", "model.dir: leading or trailing white space"},
        {"model.dir", "models\n", "leading or trailing white space"},
        {"model.dir", "mod\x01" "els", "model.dir: control character at offset 3"},
        {"model.dir", "#models", "would be read back as a comment"},
        {"model.dir", ";models", "would be read back as a comment"},
        {"lake.dir", "/srv/a #b", "lake.dir: '#' after a blank would be read back as a comment"},
        {"lake.dir", "/srv/a ;b", "';' after a blank"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fm_config c, before;
        defaults(&c);
        memcpy(&before, &c, sizeof c);
        fm_errbuf err = {{0}};
        int rc = fm_config_set(&c, cases[i].key, cases[i].value, &err);
        if (rc != FM_EINVAL || !strstr(err.msg, cases[i].msg))
            fail_msg("set %s='%s': rc=%d msg='%s', want '%s'", cases[i].key, cases[i].value, rc,
                     err.msg, cases[i].msg);
        /* The header promises c is unchanged on failure. */
        assert_memory_equal(&c, &before, sizeof c);
    }

    /* A path exactly at the field's limit fits; one byte more does not. */
    fm_config c;
    defaults(&c);
    char *p = malloc(PATH_MAX + 1);
    memset(p, 'm', PATH_MAX);
    p[PATH_MAX - 1] = '\0';
    set_ok(&c, "model.dir", p);
    p[PATH_MAX - 1] = 'm';
    p[PATH_MAX] = '\0';
    fm_errbuf err;
    assert_int_equal(fm_config_set(&c, "model.dir", p, &err), FM_EINVAL);
    assert_non_null(strstr(err.msg, "longer than the limit"));
    free(p);

    assert_int_equal(fm_config_set(&c, NULL, "1", &err), FM_EINVAL);
    assert_int_equal(fm_config_set(&c, "http.port", NULL, NULL), FM_EINVAL);
}

/* ---- parse ---------------------------------------------------------------------- */

static void test_parse(void **state)
{
    (void)state;
    static const char text[] =
        "# fleetml test configuration\n"
        "; another comment style\n"
        "\n"
        "[node]\n"
        "id = lab-2\n"
        "  log_level=warn   \n"
        "\t[ broker ]  # trailing comment\n"
        "mode = external ; inline comment\n"
        "host = broker.local   # the external broker\n"
        "port = 18883\n"
        "\n"
        "[http]\r\n"                   /* CRLF line endings */
        "port = 9000\r\n"
        "[lake]\n"
        "dir = /srv/lake#2\n"          /* '#' not after a blank is data */
        "roll_bytes = 65536\n"
        "[model]\n"
        "dir = My Models/v3\n"         /* spaces inside a path are kept */
        "[node]\n"                     /* a section may be reopened */
        "[pipeline]\n"
        "commit_window_us = 250"; /* no final newline */
    fm_config c;
    defaults(&c);
    fm_errbuf err;
    if (fm_config_parse(&c, text, &err) != 0)
        fail_msg("parse failed: %s", err.msg);
    assert_string_equal(c.node_id, "lab-2");
    assert_int_equal(c.log_level, FM_LOG_WARN);
    assert_string_equal(c.broker_mode, "external");
    assert_string_equal(c.broker_host, "broker.local");
    assert_int_equal(c.broker_port, 18883);
    assert_int_equal(c.http_port, 9000);
    assert_string_equal(c.lake_dir, "/srv/lake#2");
    assert_int_equal(c.lake_roll_bytes, 65536);
    assert_string_equal(c.model_dir, "My Models/v3");
    assert_int_equal(c.commit_window_us, 250);
    /* Untouched keys keep their defaults. */
    assert_int_equal(c.batch_max, 256);

    /* Empty text and comment-only text change nothing. */
    fm_config d, e;
    defaults(&d);
    memcpy(&e, &d, sizeof d);
    assert_int_equal(fm_config_parse(&d, "", &err), 0);
    assert_int_equal(fm_config_parse(&d, "# nothing\n\n   \n; here\n", &err), 0);
    assert_memory_equal(&d, &e, sizeof d);

    /* An empty value is allowed where the key allows it. */
    assert_int_equal(fm_config_parse(&d, "[lake]\ndir =\n", &err), 0);
    assert_string_equal(d.lake_dir, "");
    assert_int_equal(fm_config_parse(&d, "[lake]\nroll_seconds = # unset\n", &err), FM_EINVAL);
    assert_non_null(strstr(err.msg, "line 2: lake.roll_seconds: '' is not an integer"));
}

static void test_parse_errors(void **state)
{
    (void)state;
    static const struct {
        const char *text, *msg;
    } cases[] = {
        {"[http]\nport = 80\nport 80\n", "line 3: expected 'key = value' or '[section]'"},
        {"[htp]\nport = 80\n", "line 1: unknown section [htp]"},
        {"\n\n[http]\nprot = 80\n", "line 4: unknown key 'http.prot' (did you mean 'http.port'?)"},
        {"port = 80\n", "line 1: key 'port' is outside any [section]"},
        {"# c\n[http]\nport = eighty\n", "line 3: http.port: 'eighty' is not an integer"},
        {"[http]\nport = 80000\n", "line 2: http.port: 80000 is outside 1..65535"},
        {"[http]\nport = 80 80\n", "line 2: http.port: '80 80' is not an integer"},
        {"[http\nport = 80\n", "line 1: section header is missing ']'"},
        {"[http] x\n", "line 1: unexpected text after ']'"},
        {"[]\n", "line 1: empty section name"},
        {"[ ]\n", "line 1: empty section name"},
        {"[http]\n = 80\n", "line 2: missing key before '='"},
        {"[http]\nport = 80\n\nport = 81\n", "line 4: http.port is already set on line 2"},
        {"[http]\nport = 80\n[http]\nport = 81\n", "line 4: http.port is already set on line 2"},
        {"[broker]\nmode = embedded\n", "line 2: broker.mode: 'embedded' is not one of"},
        {"[node]\nhttp.port = 1\n", "line 2: unknown key 'node.http.port'"},
        {"[pipeline]\r\nbatch_max = 0\r\n", "line 2: pipeline.batch_max: 0 is outside 1..4096"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fm_config c;
        defaults(&c);
        fm_errbuf err = {{0}};
        int rc = fm_config_parse(&c, cases[i].text, &err);
        if (rc != FM_EINVAL || !strstr(err.msg, cases[i].msg))
            fail_msg("case %zu: rc=%d msg='%s', want '%s'", i, rc, err.msg, cases[i].msg);
    }

    /* A key longer than any known key, and a value longer than any field. */
    fm_config c;
    defaults(&c);
    fm_errbuf err;
    char *big = malloc(2 * PATH_MAX);
    snprintf(big, 2 * PATH_MAX, "[model]\n%0200d = 1\n", 0);
    assert_int_equal(fm_config_parse(&c, big, &err), FM_EINVAL);
    assert_non_null(strstr(err.msg, "line 2: key is too long"));
    int n = snprintf(big, 2 * PATH_MAX, "[model]\ndir = ");
    memset(big + n, 'd', PATH_MAX + 10);
    big[n + PATH_MAX + 10] = '\0';
    assert_int_equal(fm_config_parse(&c, big, &err), FM_EINVAL);
    assert_non_null(strstr(err.msg, "line 2: model.dir: value is too long"));
    free(big);
    assert_int_equal(fm_config_parse(&c, NULL, &err), FM_EINVAL);
}

/* ---- render / round trip ------------------------------------------------------- */

static void round_trip(const fm_config *c)
{
    char *text = NULL;
    assert_int_equal(fm_config_render(c, &text), 0);
    assert_non_null(text);
    fm_config d;
    defaults(&d);
    fm_errbuf err;
    if (fm_config_parse(&d, text, &err) != 0)
        fail_msg("rendered text does not parse: %s\n%s", err.msg, text);
    /* data_dir is not a key; it comes from --data on both sides. */
    assert_string_equal(d.data_dir, c->data_dir);
    assert_memory_equal(&d, c, sizeof d);
    fm_free(text);
}

static void test_render_round_trip(void **state)
{
    (void)state;
    fm_config c;
    defaults(&c);
    round_trip(&c);

    static const char *const kv[][2] = {
        {"node.id", "edge-7"},
        {"node.log_level", "debug"},
        {"broker.mode", "external"},
        {"broker.mosquitto", "/opt/mq bin/mosquitto"},
        {"broker.bind", "10.0.0.1"},
        {"broker.port", "18883"},
        {"broker.service_port", "18884"},
        {"broker.host", "mq.example.org"},
        {"broker.max_payload", "262144"},
        {"http.bind", "::1"},
        {"http.port", "9443"},
        {"pipeline.commit_window_us", "0"},
        {"pipeline.batch_max", "1"},
        {"pipeline.queue_max", "16777216"},
        {"store.backend", "postgres"},
        {"lake.backend", "s3"},
        {"lake.dir", "/srv/lake;x#y"},
        {"lake.roll_bytes", "123456"},
        {"lake.roll_seconds", "1"},
        {"model.dir", "rel/models dir"},
    };
    for (size_t i = 0; i < sizeof kv / sizeof kv[0]; i++)
        set_ok(&c, kv[i][0], kv[i][1]);
    round_trip(&c);

    set_ok(&c, "lake.dir", "");
    round_trip(&c);

    /* The rendered file is annotated: help, ranges and choices. */
    char *text;
    assert_int_equal(fm_config_render(&c, &text), 0);
    assert_non_null(strstr(text, "[pipeline]\n"));
    assert_non_null(strstr(text, "Range 0..2000.\ncommit_window_us = 0\n"));
    assert_non_null(strstr(text, "One of: supervised, external.\nmode = external\n"));
    assert_non_null(strstr(text, "One of: debug, info, warn, error.\nlog_level = debug\n"));
    char want[PATH_MAX + 32];
    snprintf(want, sizeof want, "# data directory: %s\n", c.data_dir);
    assert_non_null(strstr(text, want));
    fm_free(text);
}

static void test_render_alloc_failure(void **state)
{
    (void)state;
    fm_config c;
    defaults(&c);
    /* A long path forces the buffer to grow, so there is more than one
     * allocation to fail. */
    char *p = malloc(PATH_MAX);
    memset(p, 'p', PATH_MAX - 1);
    p[PATH_MAX - 1] = '\0';
    set_ok(&c, "model.dir", p);
    free(p);
    bool ok = false;
    for (long n = 0; n < 100 && !ok; n++) {
        char *text = (char *)1;
        fm_alloc_fail_after(n);
        int rc = fm_config_render(&c, &text);
        fm_alloc_fail_after(-1);
        if (rc == 0) {
            ok = true;
            assert_true(n > 1);
            fm_free(text);
        } else {
            assert_int_equal(rc, FM_ENOMEM);
            assert_null(text);
        }
    }
    assert_true(ok);
}

/* ---- load ----------------------------------------------------------------------- */

static void write_file(const char *path, const char *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

static void test_load(void **state)
{
    (void)state;
    fm_config c, before;
    defaults(&c);
    memcpy(&before, &c, sizeof c);
    fm_errbuf err;
    char path[PATH_MAX];

    /* A missing file is not an error and changes nothing. */
    assert_non_null(fm_config_path(&c, "absent.conf", path, sizeof path));
    assert_int_equal(fm_config_load(&c, path, &err), 0);
    assert_memory_equal(&c, &before, sizeof c);

    assert_non_null(fm_config_path(&c, "fleetml.conf", path, sizeof path));
    static const char good[] = "[http]\nport = 8181\n";
    write_file(path, good, sizeof good - 1);
    assert_int_equal(fm_config_load(&c, path, &err), 0);
    assert_int_equal(c.http_port, 8181);

    static const char bad[] = "[http]\n\nport = x\n";
    write_file(path, bad, sizeof bad - 1);
    assert_int_equal(fm_config_load(&c, path, &err), FM_EINVAL);
    assert_non_null(strstr(err.msg, "line 3: http.port"));

    static const char nul[] = "[http]\nport = 80\0\n";
    write_file(path, nul, sizeof nul - 1);
    assert_int_equal(fm_config_load(&c, path, &err), FM_EINVAL);
    assert_non_null(strstr(err.msg, "NUL byte"));

    /* A directory cannot be read as a file. */
    assert_int_equal(fm_config_load(&c, tmpdir, &err), FM_EIO);
    assert_int_equal(fm_config_load(&c, NULL, &err), FM_EINVAL);
    unlink(path);
}

/* ---- paths ---------------------------------------------------------------------- */

static void test_path(void **state)
{
    (void)state;
    fm_config c;
    char buf[PATH_MAX + 64], want[PATH_MAX + 64];
    defaults(&c);
    snprintf(want, sizeof want, "%s/pki/ca.crt", tmpdir);
    assert_ptr_equal(fm_config_path(&c, "pki/ca.crt", buf, sizeof buf), buf);
    assert_string_equal(buf, want);
    assert_string_equal(fm_config_path(&c, "/etc/x", buf, sizeof buf), "/etc/x");
    assert_string_equal(fm_config_path(&c, "", buf, sizeof buf), tmpdir);

    assert_int_equal(fm_config_defaults(&c, "/"), 0);
    assert_string_equal(fm_config_path(&c, "pki", buf, sizeof buf), "/pki");

    /* Exactly fitting versus one byte short. */
    assert_string_equal(fm_config_path(&c, "ab", buf, 4), "/ab");
    assert_null(fm_config_path(&c, "ab", buf, 3));
    assert_null(fm_config_path(&c, NULL, buf, sizeof buf));
    assert_null(fm_config_path(&c, "x", NULL, 10));
    assert_null(fm_config_path(&c, "x", buf, 0));
}

/* broker.url: mqtts://host:port only; the parse writes nothing on error. */
static void test_broker_url(void **state)
{
    (void)state;
    char host[64] = "unchanged";
    int port = 7;
    assert_int_equal(fm_mqtt_parse_url("mqtts://broker.example:8883", host, sizeof host, &port), 0);
    assert_string_equal(host, "broker.example");
    assert_int_equal(port, 8883);
    assert_int_equal(fm_mqtt_parse_url("mqtts://[::1]:1883", host, sizeof host, &port), 0);
    assert_string_equal(host, "::1");
    assert_int_equal(port, 1883);
    const char *bad[] = {"mqtt://h:1883", "mqtts://h", "mqtts://h:", "mqtts://h:0",
                         "mqtts://h:65536", "mqtts://h:88x", "mqtts://:8883", "mqtts://u@h:8883",
                         "mqtts://h/x:8883", "mqtts://[::1]8883", "", NULL};
    for (int i = 0; bad[i]; i++) {
        snprintf(host, sizeof host, "unchanged");
        port = 7;
        assert_int_equal(fm_mqtt_parse_url(bad[i], host, sizeof host, &port), FM_EINVAL);
        assert_string_equal(host, "unchanged");
        assert_int_equal(port, 7);
    }
    char tiny[4];
    assert_int_equal(fm_mqtt_parse_url("mqtts://longhost:1", tiny, sizeof tiny, &port), FM_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_broker_url),
        cmocka_unit_test(test_defaults_model_env),
        cmocka_unit_test(test_defaults_data_dir),
        cmocka_unit_test(test_set_every_key),
        cmocka_unit_test(test_set_errors),
        cmocka_unit_test(test_parse),
        cmocka_unit_test(test_parse_errors),
        cmocka_unit_test(test_render_round_trip),
        cmocka_unit_test(test_render_alloc_failure),
        cmocka_unit_test(test_load),
        cmocka_unit_test(test_path),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
