/*
 * Function pool unit tests: real workers (a Python script the tests write)
 * under the real bwrap sandbox. What a call sees (results, the function's
 * errors, timeouts, garbage, crashes), how the pool scales up and back
 * down, what the sandbox lets a worker do, and that nothing is left
 * running after a pool stops.
 *
 * Timing: CI is a busy two-core machine, so every wait for a state is a
 * poll of the pool's counters with a generous bound, never a bare sleep.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "fleetml/functions.h"
#include "functions/functions_int.h"

#include <errno.h>
#include <ftw.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* One worker for every test; what it does is chosen by the event (and by
 * $MODE for how it starts). */
static const char worker_py[] =
    "#!/usr/bin/python3\n"
    "import ctypes, errno, json, os, socket, sys, time\n"
    "def answer(o):\n"
    "    sys.stdout.write(json.dumps(o) + '\\n')\n"
    "    sys.stdout.flush()\n"
    "def attempt(fn):\n"
    "    try:\n"
    "        fn()\n"
    "        return 'ok'\n"
    "    except OSError as e:\n"
    "        return errno.errorcode.get(e.errno, str(e.errno))\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "def sys_call(name, *args):\n"
    "    if getattr(libc, name)(*args) != 0:\n"
    "        e = ctypes.get_errno()\n"
    "        raise OSError(e, os.strerror(e))\n"
    "def probe():\n"
    "    def write(path):\n"
    "        with open(path, 'w') as f:\n"
    "            f.write('x')\n"
    "    def sock(family):\n"
    "        socket.socket(family, socket.SOCK_STREAM).close()\n"
    "    return {'shadow': attempt(lambda: open('/etc/shadow').read()),\n"
    "            'write_usr': attempt(lambda: write('/usr/x')),\n"
    "            'write_fn': attempt(lambda: write('/fn/x')),\n"
    "            'write_tmp': attempt(lambda: write('/tmp/x')),\n"
    "            'inet': attempt(lambda: sock(socket.AF_INET)),\n"
    "            'inet6': attempt(lambda: sock(socket.AF_INET6)),\n"
    "            'unix': attempt(lambda: sock(socket.AF_UNIX)),\n"
    "            'unshare': attempt(lambda: sys_call('unshare', 0x10000000)),\n"
    "            'ptrace': attempt(lambda: sys_call('ptrace', 0, 0, 0, 0)),\n"
    "            'home': os.path.exists('/home'),\n"
    "            'uid': os.getuid(), 'gid': os.getgid(),\n"
    "            'env': dict(os.environ)}\n"
    "mode = os.environ.get('MODE', '')\n"
    "sys.stderr.write('worker says hello\\n')\n"
    "if mode == 'noready':\n"
    "    time.sleep(3600)\n"
    "if mode == 'badready':\n"
    "    answer({'ready': False})\n"
    "    time.sleep(3600)\n"
    "if mode == 'exit':\n"
    "    sys.exit(3)\n"
    "answer({'ready': True})\n"
    "for line in sys.stdin:\n"
    "    req = json.loads(line)\n"
    "    rid, ev = req['id'], req['event']\n"
    "    if not isinstance(ev, dict):\n"
    "        ev = {'value': ev}\n"
    "    if 'sleep' in ev:\n"
    "        time.sleep(ev['sleep'])\n"
    "    if 'spin' in ev:\n"
    "        end = time.time() + ev['spin']\n"
    "        while time.time() < end:\n"
    "            pass\n"
    "    if ev.get('garbage'):\n"
    "        sys.stdout.write('this is not JSON\\n')\n"
    "        sys.stdout.flush()\n"
    "    elif ev.get('wrong_id'):\n"
    "        answer({'id': rid + 'x', 'result': 1})\n"
    "    elif ev.get('long'):\n"
    "        sys.stdout.write('x' * ((1 << 20) + 10) + '\\n')\n"
    "        sys.stdout.flush()\n"
    "    elif 'error' in ev:\n"
    "        answer({'id': rid, 'error': ev['error']})\n"
    "    elif ev.get('probe'):\n"
    "        answer({'id': rid, 'result': probe()})\n"
    "    elif 'alloc_mb' in ev:\n"
    "        try:\n"
    "            b = bytearray(ev['alloc_mb'] << 20)\n"
    "            answer({'id': rid, 'result': len(b) >> 20})\n"
    "            del b\n"
    "        except MemoryError:\n"
    "            answer({'id': rid, 'error': 'MemoryError'})\n"
    "    else:\n"
    "        answer({'id': rid, 'result': {'echo': req['event'], 'uid': os.getuid()}})\n"
    "    if ev.get('exit'):\n"
    "        sys.exit(0)\n";

/* ---- helpers ----------------------------------------------------------------- */

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

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static int64_t now_ms(void) { return (int64_t)(fm_mono_ns() / 1000000u); }

/* Every worker is a child of this process: none may be left, not even a
 * zombie, once its pool has stopped. */
static void assert_no_children(void)
{
    errno = 0;
    assert_int_equal(waitpid(-1, NULL, WNOHANG), -1);
    assert_int_equal(errno, ECHILD);
}

typedef struct fixture {
    char dir[256];
    char cmd[300];
    char logs[300];
} fixture;

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    pfmt(f->dir, sizeof f->dir, "/tmp/fm-fn-XXXXXX");
    if (!mkdtemp(f->dir))
        return -1;
    pfmt(f->cmd, sizeof f->cmd, "%s/worker.py", f->dir);
    pfmt(f->logs, sizeof f->logs, "%s/logs", f->dir);
    FILE *fp = fopen(f->cmd, "w");
    if (!fp)
        return -1;
    fputs(worker_py, fp);
    fclose(fp);
    chmod(f->cmd, 0755);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    nftw(f->dir, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

static void spec_for(const fixture *f, fm_fn_spec *s, const char *name)
{
    fm_fn_spec_defaults(s);
    pfmt(s->name, sizeof s->name, "%s", name);
    s->command = f->cmd;
    s->log_dir = f->logs;
    s->start_timeout_ms = 10000;
    s->timeout_ms = 10000;
}

/* A call whose answer is parsed back (NULL on failure). */
static json_t *call(fm_fn_pool *p, const char *event, int *rc, fm_errbuf *err)
{
    char *res = NULL;
    *rc = fm_fn_call(p, event, &res, NULL, err);
    if (*rc) {
        assert_null(res);
        return NULL;
    }
    assert_non_null(res);
    json_error_t je;
    json_t *v = json_loads(res, JSON_DECODE_ANY, &je);
    assert_non_null(v);
    fm_free(res);
    return v;
}

/* Polls the pool's counters every 50 ms until cond holds, 10 s at most. */
#define WAIT_STATS(p, s, cond)                                                                   \
    do {                                                                                         \
        bool ok_ = false;                                                                        \
        for (int i_ = 0; i_ < 200 && !ok_; i_++) {                                               \
            fm_fn_pool_stats((p), &(s));                                                         \
            ok_ = (cond);                                                                        \
            if (!ok_)                                                                            \
                sleep_ms(50);                                                                    \
        }                                                                                        \
        assert_true(ok_);                                                                        \
    } while (0)

static void assert_echo(fm_fn_pool *p, const char *event)
{
    int rc;
    fm_errbuf err;
    json_t *v = call(p, event, &rc, &err);
    if (rc)
        fail_msg("call failed: %d %s", rc, err.msg);
    json_t *want = json_loads(event, JSON_DECODE_ANY, NULL);
    assert_true(json_equal(json_object_get(v, "echo"), want));
    json_decref(want);
    json_decref(v);
}

/* ---- the sandbox's pieces ----------------------------------------------------- */

static bool has_seq(char **v, const char *a, const char *b)
{
    for (size_t i = 0; v[i]; i++)
        if (strcmp(v[i], a) == 0 && (!b || (v[i + 1] && strcmp(v[i + 1], b) == 0)))
            return true;
    return false;
}

static void test_bwrap_options(void **state)
{
    (void)state;
    fm_fn_spec s;
    fm_fn_spec_defaults(&s);
    pfmt(s.name, sizeof s.name, "opts");
    s.command = "/srv/fn/notify/notify.py";
    s.env[0] = "WARD=icu=2";
    s.env[1] = "TOKEN=";
    char **v = NULL;
    fm_errbuf err;
    assert_int_equal(fn__bwrap_options(&s, 3, &v, &err), 0);
    assert_true(has_seq(v, "--unshare-all", NULL));
    assert_false(has_seq(v, "--share-net", NULL));
    assert_true(has_seq(v, "--ro-bind", "/srv/fn/notify"));
    assert_true(has_seq(v, "/srv/fn/notify", "/fn"));
    assert_true(has_seq(v, "--uid", "65534"));
    assert_true(has_seq(v, "--clearenv", NULL));
    assert_true(has_seq(v, "WARD", "icu=2"));
    assert_true(has_seq(v, "TOKEN", ""));
    assert_true(has_seq(v, "--seccomp", "3"));
    assert_false(has_seq(v, "--ro-bind-try", "/etc/resolv.conf"));
    fn__strv_free(v);

    s.network = true;
    assert_int_equal(fn__bwrap_options(&s, 3, &v, &err), 0);
    assert_true(has_seq(v, "--share-net", NULL));
    assert_true(has_seq(v, "--ro-bind-try", "/etc/resolv.conf"));
    fn__strv_free(v);

    s.env[2] = "NOVALUE";
    assert_int_equal(fn__bwrap_options(&s, 3, &v, &err), FM_EINVAL);
    assert_null(v);

    void *bpf = NULL;
    size_t len = 0;
    assert_int_equal(fn__seccomp_export(false, &bpf, &len, &err), 0);
    assert_true(len > 0 && len % 8 == 0);
    fm_free(bpf);
}

static void test_spec_checks(void **state)
{
    fixture *f = *state;
    fm_fn_spec s;
    fm_fn_pool *p = (fm_fn_pool *)1;
    fm_errbuf err;

    spec_for(f, &s, "Bad!");
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), FM_EINVAL);
    assert_null(p);
    spec_for(f, &s, "ok");
    s.min_workers = 5;
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), FM_EINVAL);
    assert_non_null(strstr(err.msg, "min_workers"));
    spec_for(f, &s, "ok");
    s.memory_mb = 1;
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), FM_EINVAL);
    spec_for(f, &s, "ok");
    s.command = "worker.py";
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), FM_EINVAL);

    char missing[320];
    pfmt(missing, sizeof missing, "%s/missing.py", f->dir);
    spec_for(f, &s, "ok");
    s.command = missing;
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), FM_ENOTFOUND);

    spec_for(f, &s, "ok");
    s.bwrap = "/nonexistent/bwrap";
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), FM_EUNAVAIL);
    assert_null(p);
    assert_no_children();
}

/* Every allocation of a start and of a call, failed in turn: a clean
 * error (or success when the failure landed elsewhere), nothing leaked
 * (ASan), nothing left running. */
static void test_allocation_failures(void **state)
{
    fixture *f = *state;
    fm_fn_spec s;
    spec_for(f, &s, "torture");
    s.min_workers = 0;
    s.env[0] = "WARD=icu";
    fm_fn_pool *p = NULL;
    fm_errbuf err;
    int failed = 0;
    for (long n = 0; n < 400; n++) {
        fm_alloc_fail_after(n);
        int rc = fm_fn_pool_start(&s, &p, &err);
        fm_alloc_fail_after(-1);
        if (rc == 0) {
            fm_fn_pool_stop(p);
            p = NULL;
            if (failed > 0 && n > 0)
                break;
            continue;
        }
        assert_int_equal(rc, FM_ENOMEM);
        assert_null(p);
        failed++;
    }
    assert_true(failed > 10);

    s.min_workers = 1;
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), 0);
    for (long n = 0; n < 8; n++) {
        char *res = NULL;
        fm_alloc_fail_after(n);
        int rc = fm_fn_call(p, "{\"a\": [1, 2, 3]}", &res, NULL, &err);
        fm_alloc_fail_after(-1);
        if (rc == 0)
            fm_free(res);
        else
            assert_int_equal(rc, FM_ENOMEM);
        assert_echo(p, "{\"after\": \"enomem\"}");
    }
    fm_fn_pool_stop(p);
    assert_no_children();
}

/* ---- calls ---------------------------------------------------------------------- */

static void test_echo(void **state)
{
    fixture *f = *state;
    fm_fn_spec s;
    spec_for(f, &s, "echo");
    fm_fn_pool *p = NULL;
    fm_errbuf err;
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), 0);
    assert_string_equal(fm_fn_pool_name(p), "echo");

    char *res = NULL;
    int64_t us = -1;
    int rc = fm_fn_call(p, "{\"device\": \"d1\", \"v\": [1, 2.5, \"x\\ny\"]}", &res, &us, &err);
    if (rc)
        fail_msg("call failed: %d %s", rc, err.msg);
    assert_true(us > 0);
    json_t *v = json_loads(res, 0, NULL);
    fm_free(res);
    json_t *want = json_loads("{\"device\": \"d1\", \"v\": [1, 2.5, \"x\\ny\"]}", 0, NULL);
    assert_true(json_equal(json_object_get(v, "echo"), want));
    /* The worker runs as nobody. */
    assert_int_equal(json_integer_value(json_object_get(v, "uid")), 65534);
    json_decref(want);
    json_decref(v);

    assert_echo(p, "42");
    assert_echo(p, "\"text\"");

    res = (char *)1;
    assert_int_equal(fm_fn_call(p, "{not json", &res, NULL, &err), FM_EINVAL);
    assert_null(res);
    /* A request line may not pass FM_FN_LINE_MAX. */
    size_t big = FM_FN_LINE_MAX + 16;
    char *huge = malloc(big + 3);
    huge[0] = '"';
    memset(huge + 1, 'a', big);
    huge[big + 1] = '"';
    huge[big + 2] = '\0';
    assert_int_equal(fm_fn_call(p, huge, &res, NULL, &err), FM_EINVAL);
    free(huge);

    fm_fn_stats st;
    fm_fn_pool_stats(p, &st);
    assert_int_equal(st.workers, 1);
    assert_int_equal(st.busy, 0);
    assert_int_equal(st.starts, 1);
    assert_int_equal(st.calls, 3);
    assert_int_equal(st.failures, 0);
    assert_true(st.last_start_ms >= 0);
    uint64_t n = 0;
    for (int i = 0; i < 12; i++)
        n += st.duration_us[i];
    assert_int_equal(n, 3);
    assert_true(st.duration_sum_us > 0);
    assert_true(fm_fn_buckets_us[11] == INT64_MAX);
    fm_fn_pool_stop(p);
    assert_no_children();

    /* The worker's stderr is the function's log. */
    char log[400], *text = NULL;
    pfmt(log, sizeof log, "%s/echo.log", f->logs);
    assert_int_equal(fm_read_file(log, &text, NULL), 0);
    assert_non_null(strstr(text, "worker says hello"));
    fm_free(text);
}

typedef struct caller {
    fm_fn_pool *p;
    int id;
    int ok, wrong, failed;
    int last_rc;
    char msg[512];
} caller;

static void *call_many(void *arg)
{
    caller *c = arg;
    for (int i = 0; i < 4; i++) {
        char ev[128];
        snprintf(ev, sizeof ev, "{\"sleep\": 0.15, \"thread\": %d, \"i\": %d}", c->id, i);
        char *res = NULL;
        fm_errbuf err;
        int rc = fm_fn_call(c->p, ev, &res, NULL, &err);
        if (rc) {
            c->failed++;
            c->last_rc = rc;
            snprintf(c->msg, sizeof c->msg, "%s", err.msg);
            continue;
        }
        json_t *v = json_loads(res, 0, NULL), *want = json_loads(ev, 0, NULL);
        if (json_equal(json_object_get(v, "echo"), want))
            c->ok++;
        else
            c->wrong++;
        json_decref(v);
        json_decref(want);
        fm_free(res);
    }
    return NULL;
}

static void test_parallel_scales_up(void **state)
{
    fixture *f = *state;
    fm_fn_spec s;
    spec_for(f, &s, "parallel");
    s.min_workers = 1;
    s.max_workers = 3;
    s.timeout_ms = 30000;
    fm_fn_pool *p = NULL;
    fm_errbuf err;
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), 0);
    caller c[6];
    pthread_t t[6];
    for (int i = 0; i < 6; i++) {
        c[i] = (caller){.p = p, .id = i};
        assert_int_equal(pthread_create(&t[i], NULL, call_many, &c[i]), 0);
    }
    for (int i = 0; i < 6; i++) {
        pthread_join(t[i], NULL);
        if (c[i].failed)
            fail_msg("thread %d: %d failed calls, last %d %s", i, c[i].failed, c[i].last_rc,
                     c[i].msg);
        assert_int_equal(c[i].ok, 4);
        assert_int_equal(c[i].wrong, 0);
    }
    fm_fn_stats st;
    fm_fn_pool_stats(p, &st);
    assert_int_equal(st.calls, 24);
    assert_int_equal(st.starts, 3); /* scaled up to max_workers, and no further */
    assert_int_equal(st.crashes, 0);
    assert_true(st.workers <= 3);
    /* The threads that made the calls are gone; the workers are not
     * (they were forked by the pool's own thread). */
    assert_echo(p, "{\"after\": 1}");
    fm_fn_pool_stats(p, &st);
    assert_int_equal(st.crashes, 0);
    fm_fn_pool_stop(p);
    assert_no_children();
}

static void test_timeout_replaces(void **state)
{
    fixture *f = *state;
    fm_fn_spec s;
    spec_for(f, &s, "slow");
    s.max_workers = 1;
    s.timeout_ms = 1000;
    fm_fn_pool *p = NULL;
    fm_errbuf err;
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), 0);
    int rc;
    int64_t t0 = now_ms();
    assert_null(call(p, "{\"sleep\": 60}", &rc, &err));
    int64_t took = now_ms() - t0;
    assert_int_equal(rc, FM_ETIMEDOUT);
    assert_true(took >= 900 && took < 5000);
    fm_fn_stats st;
    fm_fn_pool_stats(p, &st);
    assert_int_equal(st.failures, 1);
    assert_int_equal(st.crashes, 1);
    /* min_workers brings a replacement. */
    WAIT_STATS(p, st, st.starts == 2 && st.workers == 1);
    assert_echo(p, "{\"after\": \"timeout\"}");
    fm_fn_pool_stats(p, &st);
    assert_int_equal(st.calls, 1);
    fm_fn_pool_stop(p);
    assert_no_children();
}

static void test_garbage_is_eproto(void **state)
{
    fixture *f = *state;
    fm_fn_spec s;
    spec_for(f, &s, "garbage");
    s.max_workers = 1;
    fm_fn_pool *p = NULL;
    fm_errbuf err;
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), 0);
    int rc;
    const char *bad[] = {"{\"garbage\": true}", "{\"wrong_id\": true}", "{\"long\": true}"};
    for (int i = 0; i < 3; i++) {
        assert_null(call(p, bad[i], &rc, &err));
        assert_int_equal(rc, FM_EPROTO);
        assert_echo(p, "{\"after\": \"garbage\"}");
    }
    fm_fn_stats st;
    fm_fn_pool_stats(p, &st);
    assert_int_equal(st.failures, 3);
    assert_int_equal(st.crashes, 3);
    assert_int_equal(st.calls, 3);
    assert_true(st.starts >= 4);
    fm_fn_pool_stop(p);
    assert_no_children();
}

static void test_function_error_keeps_worker(void **state)
{
    fixture *f = *state;
    fm_fn_spec s;
    spec_for(f, &s, "errors");
    fm_fn_pool *p = NULL;
    fm_errbuf err;
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), 0);
    int rc;
    assert_null(call(p, "{\"error\": \"boom\"}", &rc, &err));
    assert_int_equal(rc, FM_EMODEL);
    assert_non_null(strstr(err.msg, "boom"));
    assert_echo(p, "{\"after\": \"boom\"}");
    fm_fn_stats st;
    fm_fn_pool_stats(p, &st);
    assert_int_equal(st.errors, 1);
    assert_int_equal(st.calls, 1);
    assert_int_equal(st.starts, 1); /* the same worker answered */
    assert_int_equal(st.crashes, 0);
    assert_int_equal(st.failures, 0);
    fm_fn_pool_stop(p);
    assert_no_children();
}

static void test_worker_exit_is_replaced(void **state)
{
    fixture *f = *state;
    fm_fn_spec s;
    spec_for(f, &s, "exits");
    s.max_workers = 1;
    fm_fn_pool *p = NULL;
    fm_errbuf err;
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), 0);
    /* The call after a worker's exit comes right away: it must not fail
     * for the dead worker, whatever the pool has noticed by then. */
    for (int i = 0; i < 5; i++) {
        assert_echo(p, "{\"exit\": true}");
        assert_echo(p, "{\"after\": \"exit\"}");
    }
    fm_fn_stats st;
    fm_fn_pool_stats(p, &st);
    assert_int_equal(st.calls, 10);
    assert_int_equal(st.failures, 0);
    assert_true(st.starts >= 6);
    fm_fn_pool_stop(p);
    assert_no_children();
}

static void test_start_failures(void **state)
{
    fixture *f = *state;
    fm_fn_spec s;
    fm_fn_pool *p = NULL;
    fm_errbuf err;

    /* Never ready: the start fails at start_timeout_ms, nothing left. */
    spec_for(f, &s, "noready");
    s.env[0] = "MODE=noready";
    s.start_timeout_ms = 1500;
    int64_t t0 = now_ms();
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), FM_ETIMEDOUT);
    int64_t took = now_ms() - t0;
    assert_true(took >= 1400 && took < 10000);
    assert_null(p);
    assert_no_children();

    spec_for(f, &s, "badready");
    s.env[0] = "MODE=badready";
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), FM_EPROTO);
    assert_no_children();

    spec_for(f, &s, "exits");
    s.env[0] = "MODE=exit";
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), FM_EPROTO);
    assert_non_null(strstr(err.msg, "exited"));
    assert_no_children();

    /* With min_workers 0 the start succeeds and the call reports why no
     * worker can run, at once rather than at its deadline. */
    spec_for(f, &s, "lazy");
    s.env[0] = "MODE=exit";
    s.min_workers = 0;
    s.timeout_ms = 30000;
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), 0);
    int rc;
    t0 = now_ms();
    assert_null(call(p, "{}", &rc, &err));
    assert_int_equal(rc, FM_EPROTO);
    assert_true(now_ms() - t0 < 15000);
    fm_fn_stats st;
    fm_fn_pool_stats(p, &st);
    assert_int_equal(st.failures, 1);
    assert_int_equal(st.starts, 0);
    fm_fn_pool_stop(p);
    assert_no_children();
}

/* ---- the sandbox ---------------------------------------------------------------- */

static json_t *probe(const fixture *f, bool network)
{
    fm_fn_spec s;
    spec_for(f, &s, network ? "probe-net" : "probe");
    s.network = network;
    s.env[0] = "WARD=icu-2";
    fm_fn_pool *p = NULL;
    fm_errbuf err;
    if (fm_fn_pool_start(&s, &p, &err) != 0)
        fail_msg("start: %s", err.msg);
    int rc;
    json_t *v = call(p, "{\"probe\": true}", &rc, &err);
    if (rc)
        fail_msg("probe: %d %s", rc, err.msg);
    fm_fn_pool_stop(p);
    assert_no_children();
    return v;
}

#define ASSERT_PROBE(v, key, want) \
    assert_string_equal(json_string_value(json_object_get((v), (key))), (want))

static void test_sandbox(void **state)
{
    fixture *f = *state;
    /* Nothing of fleetml's environment may reach a worker. */
    setenv("FM_FN_TEST_PARENT", "leak", 1);
    json_t *v = probe(f, false);
    unsetenv("FM_FN_TEST_PARENT");
    ASSERT_PROBE(v, "shadow", "ENOENT"); /* /etc is not there at all */
    ASSERT_PROBE(v, "write_usr", "EROFS");
    ASSERT_PROBE(v, "write_fn", "EROFS");
    ASSERT_PROBE(v, "write_tmp", "ok");
    ASSERT_PROBE(v, "inet", "EACCES");
    ASSERT_PROBE(v, "inet6", "EACCES");
    ASSERT_PROBE(v, "unix", "ok");
    ASSERT_PROBE(v, "unshare", "EPERM");
    ASSERT_PROBE(v, "ptrace", "EPERM");
    assert_true(json_is_false(json_object_get(v, "home")));
    assert_int_equal(json_integer_value(json_object_get(v, "uid")), 65534);
    assert_int_equal(json_integer_value(json_object_get(v, "gid")), 65534);
    json_t *env = json_object_get(v, "env");
    assert_string_equal(json_string_value(json_object_get(env, "WARD")), "icu-2");
    assert_string_equal(json_string_value(json_object_get(env, "PATH")), "/usr/bin:/bin");
    assert_string_equal(json_string_value(json_object_get(env, "HOME")), "/tmp");
    assert_null(json_object_get(env, "FM_FN_TEST_PARENT"));
    json_decref(v);

    v = probe(f, true);
    ASSERT_PROBE(v, "inet", "ok");
    ASSERT_PROBE(v, "shadow", "ENOENT");
    ASSERT_PROBE(v, "write_usr", "EROFS");
    ASSERT_PROBE(v, "unshare", "EPERM");
    json_decref(v);
}

static void test_memory_limit(void **state)
{
    fixture *f = *state;
    fm_fn_spec s;
    spec_for(f, &s, "memory");
    s.memory_mb = 64;
    fm_fn_pool *p = NULL;
    fm_errbuf err;
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), 0);
    int rc;
    json_t *v = call(p, "{\"alloc_mb\": 8}", &rc, &err);
    if (rc)
        fail_msg("8 MB: %d %s", rc, err.msg);
    assert_int_equal(json_integer_value(v), 8);
    json_decref(v);
    /* Over the limit: Python raises MemoryError and says so, or dies. */
    assert_null(call(p, "{\"alloc_mb\": 200}", &rc, &err));
    if (rc == FM_EMODEL)
        assert_non_null(strstr(err.msg, "MemoryError"));
    else
        assert_int_equal(rc, FM_EPROTO);
    assert_echo(p, "{\"after\": \"memory\"}");
    fm_fn_pool_stop(p);
    assert_no_children();
}

static void test_cpu_limit(void **state)
{
    fixture *f = *state;
    fm_fn_spec s;
    spec_for(f, &s, "cpu");
    s.cpu_s = 1;
    s.timeout_ms = 60000;
    fm_fn_pool *p = NULL;
    fm_errbuf err;
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), 0);
    /* Spinning for 30 s of wall time: SIGXCPU ends the worker after one
     * second of CPU, long before. */
    int rc;
    int64_t t0 = now_ms();
    assert_null(call(p, "{\"spin\": 30}", &rc, &err));
    assert_int_equal(rc, FM_EPROTO);
    assert_true(now_ms() - t0 < 25000);
    assert_echo(p, "{\"after\": \"cpu\"}");
    fm_fn_stats st;
    fm_fn_pool_stats(p, &st);
    assert_int_equal(st.crashes, 1);
    fm_fn_pool_stop(p);
    assert_no_children();
}

/* ---- scaling down and stopping ---------------------------------------------------- */

static void test_idle_scale_down(void **state)
{
    fixture *f = *state;
    fm_fn_spec s;
    spec_for(f, &s, "idle");
    s.min_workers = 0;
    s.max_workers = 2;
    s.idle_ms = 300;
    s.timeout_ms = 30000;
    fm_fn_pool *p = NULL;
    fm_errbuf err;
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), 0);
    fm_fn_stats st;
    fm_fn_pool_stats(p, &st);
    assert_int_equal(st.workers, 0);
    caller c[2];
    pthread_t t[2];
    for (int i = 0; i < 2; i++) {
        c[i] = (caller){.p = p, .id = i};
        assert_int_equal(pthread_create(&t[i], NULL, call_many, &c[i]), 0);
    }
    for (int i = 0; i < 2; i++) {
        pthread_join(t[i], NULL);
        assert_int_equal(c[i].ok, 4);
    }
    fm_fn_pool_stats(p, &st);
    assert_true(st.starts >= 1 && st.starts <= 2);
    WAIT_STATS(p, st, st.workers == 0);
    assert_int_equal(st.crashes, 0);
    /* From nothing, a call starts a worker again. */
    assert_echo(p, "{\"after\": \"idle\"}");
    fm_fn_pool_stop(p);
    assert_no_children();
}

typedef struct pending {
    fm_fn_pool *p;
    const char *event;
    int rc;
} pending;

static void *call_once(void *arg)
{
    pending *c = arg;
    char *res = NULL;
    fm_errbuf err;
    c->rc = fm_fn_call(c->p, c->event, &res, NULL, &err);
    fm_free(res);
    return NULL;
}

/* The sizing rule alone: minimum, queue depth, latency, maximum. */
static void test_workers_wanted(void **state)
{
    (void)state;
    /* args: min, max, starting, idle, busy, queued, hot */
    assert_int_equal(fn__workers_wanted(1, 4, 0, 0, 0, 0, false), 1); /* up to min */
    assert_int_equal(fn__workers_wanted(2, 4, 1, 0, 0, 0, false), 1); /* one is starting */
    assert_int_equal(fn__workers_wanted(1, 4, 0, 1, 0, 0, false), 0); /* at rest */
    assert_int_equal(fn__workers_wanted(1, 4, 0, 0, 1, 2, false), 2); /* two callers wait */
    assert_int_equal(fn__workers_wanted(1, 4, 1, 0, 1, 2, false), 1); /* one start serves one */
    assert_int_equal(fn__workers_wanted(1, 4, 0, 0, 4, 3, false), 0); /* at max */
    assert_int_equal(fn__workers_wanted(1, 4, 0, 0, 3, 5, false), 1); /* capped by max */
    /* Hot: one spare beyond the busy workers, not more, never above max. */
    assert_int_equal(fn__workers_wanted(1, 4, 0, 0, 2, 0, true), 1);
    assert_int_equal(fn__workers_wanted(1, 4, 0, 1, 2, 0, true), 0);
    assert_int_equal(fn__workers_wanted(1, 4, 1, 0, 2, 0, true), 0);
    assert_int_equal(fn__workers_wanted(1, 6, 0, 0, 2, 2, true), 3);
    assert_int_equal(fn__workers_wanted(1, 4, 0, 0, 2, 2, true), 2);
    assert_int_equal(fn__workers_wanted(1, 2, 0, 0, 2, 0, true), 0);
    assert_int_equal(fn__workers_wanted(0, 4, 0, 0, 0, 0, true), 1);
}

/* Two callers at once against one warm worker: the second waits for a
 * start. With latency scaling the pool then keeps a spare, so it grows to
 * three workers for two callers; without it, to two. */
static int burst_of_two(fixture *f, int target_wait_ms, fm_fn_stats *st)
{
    fm_fn_spec s;
    spec_for(f, &s, target_wait_ms ? "ahead" : "no-ahead");
    s.min_workers = 1;
    s.max_workers = 3;
    s.idle_ms = 60000;
    s.timeout_ms = 30000;
    s.target_wait_ms = target_wait_ms;
    fm_fn_pool *p = NULL;
    fm_errbuf err;
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), 0);
    WAIT_STATS(p, *st, st->workers == 1 && st->starts == 1);
    pending c[2];
    pthread_t t[2];
    for (int i = 0; i < 2; i++) {
        c[i] = (pending){.p = p, .event = "{\"sleep\": 0.4}"};
        assert_int_equal(pthread_create(&t[i], NULL, call_once, &c[i]), 0);
    }
    for (int i = 0; i < 2; i++) {
        pthread_join(t[i], NULL);
        assert_int_equal(c[i].rc, 0);
    }
    int want = target_wait_ms ? 3 : 2;
    WAIT_STATS(p, *st, st->workers == want && st->busy == 0);
    fm_fn_pool_stats(p, st);
    fm_fn_pool_stop(p);
    assert_no_children();
    return st->workers;
}

static void test_latency_scales_ahead(void **state)
{
    fixture *f = *state;
    fm_fn_stats st;
    assert_int_equal(burst_of_two(f, 1, &st), 3);
    assert_int_equal(st.starts, 3);
    assert_true(st.waited >= 1);
    assert_true(st.hot);
    assert_int_equal(st.calls, 2);
    assert_int_equal(burst_of_two(f, 0, &st), 2);
    assert_int_equal(st.starts, 2);
    assert_int_equal(st.waited, 0);
    assert_false(st.hot);
}

static void test_stop_ends_calls(void **state)
{
    fixture *f = *state;
    fm_fn_spec s;
    spec_for(f, &s, "stop");
    s.max_workers = 1;
    s.timeout_ms = 60000;
    fm_fn_pool *p = NULL;
    fm_errbuf err;
    assert_int_equal(fm_fn_pool_start(&s, &p, &err), 0);
    pending busy = {p, "{\"sleep\": 60}", 1}, waiting = {p, "{}", 1};
    pthread_t tb, tw;
    fm_fn_stats st;
    assert_int_equal(pthread_create(&tb, NULL, call_once, &busy), 0);
    WAIT_STATS(p, st, st.busy == 1);
    assert_int_equal(pthread_create(&tw, NULL, call_once, &waiting), 0);
    WAIT_STATS(p, st, st.queued == 1);
    int64_t t0 = now_ms();
    fm_fn_pool_stop(p);
    assert_true(now_ms() - t0 < 10000);
    pthread_join(tb, NULL);
    pthread_join(tw, NULL);
    assert_int_equal(busy.rc, FM_ESTATE);
    assert_int_equal(waiting.rc, FM_ESTATE);
    assert_no_children();
    fm_fn_pool_stop(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bwrap_options),
        cmocka_unit_test_setup_teardown(test_spec_checks, setup, teardown),
        cmocka_unit_test_setup_teardown(test_allocation_failures, setup, teardown),
        cmocka_unit_test_setup_teardown(test_echo, setup, teardown),
        cmocka_unit_test_setup_teardown(test_parallel_scales_up, setup, teardown),
        cmocka_unit_test_setup_teardown(test_timeout_replaces, setup, teardown),
        cmocka_unit_test_setup_teardown(test_garbage_is_eproto, setup, teardown),
        cmocka_unit_test_setup_teardown(test_function_error_keeps_worker, setup, teardown),
        cmocka_unit_test_setup_teardown(test_worker_exit_is_replaced, setup, teardown),
        cmocka_unit_test_setup_teardown(test_start_failures, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sandbox, setup, teardown),
        cmocka_unit_test_setup_teardown(test_memory_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cpu_limit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_idle_scale_down, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_ends_calls, setup, teardown),
        cmocka_unit_test(test_workers_wanted),
        cmocka_unit_test_setup_teardown(test_latency_scales_ahead, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
