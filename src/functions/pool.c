/*
 * A warm pool of one function's workers (fleetml/functions.h); how each
 * worker is sandboxed is sandbox.c's business.
 *
 * Who does what. One maintenance thread per pool owns the workers' lives:
 * it forks every worker, reads the ready lines, reaps, replaces crashed
 * workers up to min_workers, starts more while callers wait (up to
 * max_workers) and stops workers idle too long. That the forking happens
 * on this long-lived thread is not a detail: bwrap's --die-with-parent is
 * PR_SET_PDEATHSIG, which fires when the *thread* that forked exits, so a
 * worker forked on a caller's thread (an HTTP request's, say) would be
 * killed when that thread ends. Callers only borrow an idle worker under
 * the lock, talk to it outside the lock and hand it back.
 *
 * A worker's states, and who moves it (always under p->mu):
 *   FREE -> STARTING            maintenance: slot reserved, then forked
 *   STARTING -> IDLE | DEAD     maintenance: ready line, or a bad/late one
 *   IDLE -> BUSY                a caller takes it
 *   IDLE -> STOPPING            maintenance: idle too long, or the pool stops
 *   IDLE -> DEAD                anyone who finds it exited or chattering
 *   BUSY -> IDLE | DEAD         only the caller that holds it
 *   STOPPING -> FREE | DEAD     maintenance: reaped, or killed when late
 *   DEAD -> FREE                maintenance: reaped
 * A BUSY worker's descriptors and read buffer belong to its caller alone
 * (stopping the pool only signals its process). Only the maintenance
 * thread reaps, and a pid is only signalled while it is not reaped, so a
 * signal never reaches a recycled pid.
 *
 * A worker that dies between two calls is not the next call's fault: when
 * writing the request meets a closed pipe, or the answer is an end of file
 * while the request still sits unread in the pipe (FIONREAD), the call
 * moves to another worker. Only a worker that took the request and then
 * died, timed out or answered garbage fails the call.
 *
 * SIGPIPE: `serve` ignores it process-wide, but a library cannot count on
 * that (tests, `fleetml function call`), so the request is written with
 * SIGPIPE blocked in the calling thread, and a SIGPIPE our write raised is
 * consumed with sigtimedwait before the mask is restored.
 *
 * Callers waiting for a worker are not served in order: whoever finds an
 * idle worker first takes it. A call's deadline (timeout_ms) covers the
 * wait, a worker's start and the exchange.
 */
#include "functions/functions_int.h"
#include "fleetml/thread.h"

#include <errno.h>
#include <jansson.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_MS 1000000ull
/* How often the maintenance thread looks at its workers when nothing
 * wakes it: the resolution of idle_ms and of reaping. */
#define TICK_MS 200
/* How long a stopped worker has to exit after the end of its input. */
#define STOP_GRACE_MS 2000
/* After a worker fails to start, the next start waits this long, doubling
 * up to the maximum, so a broken function is not forked in a loop. */
#define BACKOFF_MIN_MS 250
#define BACKOFF_MAX_MS 10000
/* Attempts of a call beyond the first, each after a worker that died
 * without reading the request. */
#define CALL_RETRIES 2
#define BUF_INIT 4096
#define BUF_MAX ((size_t)FM_FN_LINE_MAX + 1) /* a longest line with its "\n" */

const int64_t fm_fn_buckets_us[12] = {100,    250,    500,    1000,    2000,    5000,
                                      10000,  50000,  100000, 500000, 1000000, INT64_MAX};

enum wstate { W_FREE = 0, W_STARTING, W_IDLE, W_BUSY, W_STOPPING, W_DEAD };

typedef struct worker {
    enum wstate state;
    pid_t pid; /* the bwrap launcher; 0 while STARTING and not yet forked */
    int in_fd, out_fd;
    char *buf; /* what the worker wrote and we have not used yet */
    size_t len, cap, scanned;
    uint64_t since_ns; /* STARTING: forked at; IDLE: idle since; STOPPING: kill at */
} worker;

struct fm_fn_pool {
    fm_fn_spec spec; /* a copy: name and numbers only (the strings live in sb) */
    fn__sandbox sb;
    pthread_mutex_t mu;
    pthread_cond_t cv; /* CLOCK_MONOTONIC: a worker freed or ready, a start
                          failed, a caller left, the pool stops */
    fm_thread maint;
    int wake_fd; /* eventfd: wakes the maintenance thread out of poll() */
    worker *w;
    int nslots;  /* 2 * max_workers: killed workers hold a slot until reaped */
    struct pollfd *pfds;
    int *pslot;
    _Atomic uint64_t next_id;

    /* Under mu. */
    bool stopping;
    int queued; /* callers waiting for a worker */
    int active; /* callers inside fm_fn_call */
    int start_rc; /* the last failed start, cleared by a good one */
    fm_errbuf start_err;
    uint64_t start_fails;
    uint64_t spawn_after_ns;
    int backoff_ms;
    uint64_t calls, errors, failures, starts, crashes;
    int64_t last_start_ms;
    uint64_t duration_us[12];
    uint64_t duration_sum_us;
    uint64_t waited;         /* calls that waited longer than target_wait_ms */
    uint64_t waited_at_ns;   /* the last such call's end of wait (0: never) */
    int64_t last_wait_us;
};

void fm_fn_spec_defaults(fm_fn_spec *spec)
{
    memset(spec, 0, sizeof *spec);
    spec->min_workers = 1;
    spec->max_workers = 4;
    spec->timeout_ms = 5000;
    spec->start_timeout_ms = 10000;
    spec->idle_ms = 60000;
    spec->target_wait_ms = 10;
    spec->memory_mb = 256;
    spec->cpu_s = 60;
    spec->network = false;
}

const char *fm_fn_pool_name(const fm_fn_pool *p) { return p->spec.name; }

/* ---- small helpers ------------------------------------------------------------- */

static int ms_until(uint64_t deadline, uint64_t now)
{
    if (deadline <= now)
        return 0;
    uint64_t ms = (deadline - now + NS_PER_MS - 1) / NS_PER_MS;
    return ms > 600000 ? 600000 : (int)ms;
}

/* With mu held: waits for cv at most until deadline (monotonic ns). */
static void wait_until(fm_fn_pool *p, uint64_t deadline)
{
    uint64_t now = fm_mono_ns();
    if (deadline <= now)
        return;
    struct timespec ts;
    fm_deadline_ns(&ts, CLOCK_MONOTONIC, (int64_t)(deadline - now));
    pthread_cond_timedwait(&p->cv, &p->mu, &ts);
}

static void wake_maint(fm_fn_pool *p)
{
    uint64_t one = 1;
    (void)!write(p->wake_fd, &one, sizeof one);
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

static void slot_free(worker *w)
{
    close_fd(&w->in_fd);
    close_fd(&w->out_fd);
    fm_free(w->buf);
    memset(w, 0, sizeof *w);
    w->state = W_FREE;
    w->in_fd = w->out_fd = -1;
}

/* True once w's launcher has been reaped (or was reaped by someone else:
 * ECHILD, as when SIGCHLD is ignored). */
static bool reaped(worker *w)
{
    int st;
    pid_t r = waitpid(w->pid, &st, WNOHANG);
    return r == w->pid || (r < 0 && errno == ECHILD);
}

static void count_live(const fm_fn_pool *p, int *starting, int *idle, int *busy)
{
    *starting = *idle = *busy = 0;
    for (int i = 0; i < p->nslots; i++) {
        switch (p->w[i].state) {
        case W_STARTING: (*starting)++; break;
        case W_IDLE: (*idle)++; break;
        case W_BUSY: (*busy)++; break;
        default: break;
        }
    }
}

static int live_workers(const fm_fn_pool *p)
{
    int s, i, b;
    count_live(p, &s, &i, &b);
    return s + i + b;
}

/* With mu held: kills w and leaves it to be reaped. crash counts it in the
 * stats (and the log) as a worker lost while in use. */
static void retire(fm_fn_pool *p, worker *w, bool crash, const char *why)
{
    fn__kill(w->pid);
    close_fd(&w->in_fd);
    close_fd(&w->out_fd);
    w->len = w->scanned = 0;
    w->state = W_DEAD;
    if (crash) {
        p->crashes++;
        fm_logkv(FM_LOG_WARN, "functions", "worker replaced", "function", p->spec.name,
                 "reason", why, NULL);
    }
    wake_maint(p);
}

/* With mu held: asks an idle worker to end (its input ends), killing it
 * at kill_at if it has not. */
static void stop_gently(worker *w, uint64_t kill_at)
{
    close_fd(&w->in_fd);
    w->state = W_STOPPING;
    w->since_ns = kill_at;
}

/* ---- reading lines --------------------------------------------------------------- */

/* A complete line in w->buf: 1 with *n its length (without the "\n"), 0
 * when more is needed, FM_EPROTO when it is longer than FM_FN_LINE_MAX. */
static int buf_line(worker *w, size_t *n)
{
    char *nl = memchr(w->buf + w->scanned, '\n', w->len - w->scanned);
    if (nl) {
        *n = (size_t)(nl - w->buf);
        return 1;
    }
    w->scanned = w->len;
    return w->len >= BUF_MAX ? FM_EPROTO : 0;
}

static void buf_drop(worker *w, size_t n)
{
    memmove(w->buf, w->buf + n, w->len - n);
    w->len -= n;
    w->scanned = 0;
}

/* One read() into w->buf: 1 when bytes came, 0 at end of file, FM_EIO or
 * FM_ENOMEM. Call only when buf_line said 0. */
static int buf_fill(worker *w)
{
    if (w->len == w->cap) {
        size_t cap = w->cap ? w->cap * 2 : BUF_INIT;
        if (cap > BUF_MAX)
            cap = BUF_MAX;
        char *nb = fm_realloc(w->buf, cap);
        if (!nb)
            return FM_ENOMEM;
        w->buf = nb;
        w->cap = cap;
    }
    ssize_t r;
    do
        r = read(w->out_fd, w->buf + w->len, w->cap - w->len);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        return FM_EIO;
    w->len += (size_t)r;
    return r > 0;
}

/* Waits for one line from w until deadline: 0 with *n set, FM_ETIMEDOUT,
 * FM_EPROTO (end of file: *eof; or too long), FM_EIO, FM_ENOMEM. */
static int read_line(worker *w, uint64_t deadline, size_t *n, bool *eof)
{
    for (;;) {
        int rc = buf_line(w, n);
        if (rc)
            return rc < 0 ? rc : 0;
        uint64_t now = fm_mono_ns();
        if (now >= deadline)
            return FM_ETIMEDOUT;
        struct pollfd pfd = {.fd = w->out_fd, .events = POLLIN};
        int pr = poll(&pfd, 1, ms_until(deadline, now));
        if (pr < 0 && errno != EINTR)
            return FM_EIO;
        if (pr <= 0)
            continue;
        rc = buf_fill(w);
        if (rc == 0) {
            *eof = true;
            return FM_EPROTO;
        }
        if (rc < 0)
            return rc;
    }
}

/* An idle worker is healthy when it has said nothing since its last answer
 * and its output is still open: a worker that exited shows as a hang-up. */
static bool idle_healthy(worker *w)
{
    if (w->len > 0)
        return false;
    struct pollfd pfd = {.fd = w->out_fd, .events = POLLIN};
    return poll(&pfd, 1, 0) == 0;
}

/* ---- the maintenance thread ------------------------------------------------------ */

/* With mu held: records a failed start (callers with nothing else to wait
 * for get it) and backs off before the next one. */
static void start_failed(fm_fn_pool *p, int rc, const char *msg)
{
    p->start_rc = rc;
    snprintf(p->start_err.msg, sizeof p->start_err.msg, "%s", msg);
    p->start_fails++;
    p->backoff_ms = p->backoff_ms ? p->backoff_ms * 2 : BACKOFF_MIN_MS;
    if (p->backoff_ms > BACKOFF_MAX_MS)
        p->backoff_ms = BACKOFF_MAX_MS;
    p->spawn_after_ns = fm_mono_ns() + (uint64_t)p->backoff_ms * NS_PER_MS;
    fm_logkv(FM_LOG_WARN, "functions", "worker did not start", "function", p->spec.name, "error",
             msg, NULL);
    pthread_cond_broadcast(&p->cv);
}

/* With mu held: a STARTING worker that will not get ready. */
static void start_worker_failed(fm_fn_pool *p, worker *w, int rc, const char *what)
{
    char msg[sizeof p->start_err.msg];
    snprintf(msg, sizeof msg, "function %s: the worker %s (its stderr: %s)", p->spec.name, what,
             p->sb.log_path ? p->sb.log_path : "discarded, no log_dir");
    retire(p, w, false, NULL);
    start_failed(p, rc, msg);
}

/* With mu held: the ready line of a STARTING worker that has one. */
static void check_ready(fm_fn_pool *p, worker *w, size_t n)
{
    json_error_t je;
    json_t *doc = json_loadb(w->buf, n, 0, &je);
    bool ok = json_is_object(doc) && json_is_true(json_object_get(doc, "ready"));
    json_decref(doc);
    buf_drop(w, n + 1);
    if (!ok) {
        start_worker_failed(p, w, FM_EPROTO, "did not start with {\"ready\": true}");
        return;
    }
    uint64_t now = fm_mono_ns();
    p->starts++;
    p->last_start_ms = (int64_t)((now - w->since_ns) / NS_PER_MS);
    p->start_rc = 0;
    p->backoff_ms = 0;
    p->spawn_after_ns = 0;
    w->state = W_IDLE;
    w->since_ns = now;
    pthread_cond_broadcast(&p->cv);
}

/* With mu held: reaps, notices workers that died while idle, times out
 * late starters and stopping workers, and stops idle workers above
 * min_workers (the longest idle first). */
static void tend(fm_fn_pool *p)
{
    uint64_t now = fm_mono_ns();
    uint64_t start_ns = (uint64_t)p->spec.start_timeout_ms * NS_PER_MS;
    for (int i = 0; i < p->nslots; i++) {
        worker *w = &p->w[i];
        switch (w->state) {
        case W_DEAD:
            if (reaped(w))
                slot_free(w);
            break;
        case W_STOPPING:
            if (reaped(w)) {
                slot_free(w);
            } else if (now >= w->since_ns) {
                fn__kill(w->pid);
                w->state = W_DEAD;
            }
            break;
        case W_STARTING:
            if (w->pid > 0 && now - w->since_ns >= start_ns) {
                char what[64];
                snprintf(what, sizeof what, "did not get ready within %d ms",
                         p->spec.start_timeout_ms);
                start_worker_failed(p, w, FM_ETIMEDOUT, what);
            }
            break;
        case W_IDLE:
            if (!idle_healthy(w))
                retire(p, w, true, "exited or wrote while idle");
            break;
        default:
            break;
        }
    }
    int live = live_workers(p);
    uint64_t idle_ns = (uint64_t)p->spec.idle_ms * NS_PER_MS;
    while (live > p->spec.min_workers) {
        worker *oldest = NULL;
        for (int i = 0; i < p->nslots; i++)
            if (p->w[i].state == W_IDLE && (!oldest || p->w[i].since_ns < oldest->since_ns))
                oldest = &p->w[i];
        if (!oldest || now - oldest->since_ns < idle_ns)
            break;
        stop_gently(oldest, now + (uint64_t)STOP_GRACE_MS * NS_PER_MS);
        live--;
    }
}

int fn__workers_wanted(int min_workers, int max_workers, int starting, int idle, int busy,
                       int queued, bool hot)
{
    int live = starting + idle + busy;
    int want = min_workers - live;
    /* Queue depth: one per caller nobody will serve; latency: one more
     * ready ahead of demand while calls have been waiting. */
    int demand = queued + (hot ? 1 : 0) - idle - starting;
    if (demand > want)
        want = demand;
    if (want > max_workers - live)
        want = max_workers - live;
    return want > 0 ? want : 0;
}

/* With mu held: whether a call waited longer than target_wait_ms within
 * the last idle_ms (latency scaling). */
static bool pool_hot(const fm_fn_pool *p, uint64_t now)
{
    return p->spec.target_wait_ms > 0 && p->waited_at_ns != 0 &&
           now - p->waited_at_ns < (uint64_t)p->spec.idle_ms * NS_PER_MS;
}

/* How many workers to start now (fn__workers_wanted). */
static int spawn_wanted(const fm_fn_pool *p)
{
    uint64_t now = fm_mono_ns();
    if (p->stopping || now < p->spawn_after_ns)
        return 0;
    int starting, idle, busy;
    count_live(p, &starting, &idle, &busy);
    return fn__workers_wanted(p->spec.min_workers, p->spec.max_workers, starting, idle, busy,
                              p->queued, pool_hot(p, now));
}

/* With mu held (released around each fork): starts the workers wanted. */
static void spawn_some(fm_fn_pool *p)
{
    for (int want = spawn_wanted(p); want > 0; want--) {
        worker *w = NULL;
        for (int i = 0; i < p->nslots && !w; i++)
            if (p->w[i].state == W_FREE)
                w = &p->w[i];
        if (!w)
            return; /* every slot holds a worker not yet reaped: next tick */
        w->state = W_STARTING; /* reserved: counts as live from now on */
        w->pid = 0;
        pthread_mutex_unlock(&p->mu);
        fn__proc pr = {.pid = -1, .in_fd = -1, .out_fd = -1};
        fm_errbuf e;
        char *buf = fm_malloc(BUF_INIT);
        int rc = buf ? fn__spawn(&p->sb, &pr, &e) : fm_errf(&e, FM_ENOMEM, "out of memory");
        pthread_mutex_lock(&p->mu);
        if (rc) {
            fm_free(buf);
            slot_free(w);
            char msg[sizeof e.msg];
            snprintf(msg, sizeof msg, "function %s: cannot start a worker: %.400s", p->spec.name,
                     e.msg);
            start_failed(p, rc, msg);
            return;
        }
        w->pid = pr.pid;
        w->in_fd = pr.in_fd;
        w->out_fd = pr.out_fd;
        w->buf = buf;
        w->cap = BUF_INIT;
        w->since_ns = fm_mono_ns();
    }
}

/* With mu held (released around poll): waits for a wake-up, a ready line
 * or the next tick, and handles what came from starting workers. */
static void wait_events(fm_fn_pool *p)
{
    uint64_t now = fm_mono_ns();
    int timeout = TICK_MS, n = 0;
    p->pfds[n++] = (struct pollfd){.fd = p->wake_fd, .events = POLLIN};
    for (int i = 0; i < p->nslots; i++) {
        worker *w = &p->w[i];
        if (w->state == W_STARTING && w->pid > 0) {
            int ms = ms_until(w->since_ns + (uint64_t)p->spec.start_timeout_ms * NS_PER_MS, now);
            if (ms < timeout)
                timeout = ms;
            p->pslot[n] = i;
            p->pfds[n++] = (struct pollfd){.fd = w->out_fd, .events = POLLIN};
        } else if (w->state == W_STOPPING && ms_until(w->since_ns, now) < timeout) {
            timeout = ms_until(w->since_ns, now);
        } else if (w->state == W_DEAD && timeout > 20) {
            /* Killed: reap it (and free its slot) as soon as it is gone. */
            timeout = 20;
        }
    }
    if (p->spawn_after_ns > now && ms_until(p->spawn_after_ns, now) < timeout)
        timeout = ms_until(p->spawn_after_ns, now);
    /* Only this thread changes STARTING workers, so their descriptors stay
     * valid while the lock is released. */
    pthread_mutex_unlock(&p->mu);
    int pr = poll(p->pfds, (nfds_t)n, timeout);
    pthread_mutex_lock(&p->mu);
    if (pr <= 0)
        return;
    if (p->pfds[0].revents) {
        uint64_t v;
        (void)!read(p->wake_fd, &v, sizeof v);
    }
    for (int k = 1; k < n; k++) {
        worker *w = &p->w[p->pslot[k]];
        if (!p->pfds[k].revents || w->state != W_STARTING)
            continue;
        size_t len;
        int rc = buf_fill(w);
        if (rc == 0)
            start_worker_failed(p, w, FM_EPROTO, "exited before its ready line");
        else if (rc < 0)
            start_worker_failed(p, w, rc, "could not be read from");
        else if ((rc = buf_line(w, &len)) > 0)
            check_ready(p, w, len);
        else if (rc < 0)
            start_worker_failed(p, w, FM_EPROTO, "wrote a ready line too long");
    }
}

/* With mu held, stopping set: ends every worker and waits until all are
 * reaped and every caller has left. Idle workers get the end of their
 * input and STOP_GRACE_MS to exit. A signal is no gentler: SIGTERM to bwrap
 * kills the launcher at once and with it the whole sandbox (SIGKILL). */
static void shut_down(fm_fn_pool *p)
{
    uint64_t kill_at = fm_mono_ns() + (uint64_t)STOP_GRACE_MS * NS_PER_MS;
    for (int i = 0; i < p->nslots; i++) {
        worker *w = &p->w[i];
        if (w->state == W_STARTING)
            retire(p, w, false, NULL);
        else if (w->state == W_BUSY) /* its caller sees the end of file */
            fn__kill(w->pid);
        else if (w->state == W_STOPPING && w->since_ns > kill_at)
            w->since_ns = kill_at;
    }
    pthread_cond_broadcast(&p->cv);
    for (;;) {
        uint64_t now = fm_mono_ns();
        bool left = p->active > 0;
        for (int i = 0; i < p->nslots; i++) {
            worker *w = &p->w[i];
            if (w->state == W_IDLE)
                stop_gently(w, kill_at);
            if (w->state == W_STOPPING) {
                if (reaped(w)) {
                    slot_free(w);
                    continue;
                }
                if (now >= w->since_ns) {
                    fn__kill(w->pid);
                    w->state = W_DEAD;
                }
            }
            if (w->state == W_DEAD && reaped(w))
                slot_free(w);
            left = left || w->state != W_FREE;
        }
        if (!left)
            return;
        wait_until(p, now + 20 * NS_PER_MS);
    }
}

static void *maint_main(void *arg)
{
    fm_fn_pool *p = arg;
    pthread_mutex_lock(&p->mu);
    while (!p->stopping) {
        tend(p);
        spawn_some(p);
        wait_events(p);
    }
    /* Before this thread ends: its end would kill every worker it forked
     * (--die-with-parent), with no grace. */
    shut_down(p);
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* ---- a call -------------------------------------------------------------------- */

/* A JSON value's compact text, fm_malloc'd, with room for extra bytes after
 * it (jansson's own allocation functions may be an arena's: fleetml/
 * jsonmem.h, so its json_dumps result is not ours to hand out). */
static char *dump(const json_t *v, size_t extra, size_t *len)
{
    size_t flags = JSON_COMPACT | JSON_ENCODE_ANY | JSON_PRESERVE_ORDER;
    size_t n = json_dumpb(v, NULL, 0, flags);
    if (n == 0)
        return NULL;
    char *s = fm_malloc(n + extra + 1);
    if (!s)
        return NULL;
    if (json_dumpb(v, s, n, flags) != n) {
        fm_free(s);
        return NULL;
    }
    s[n] = '\0';
    *len = n;
    return s;
}

/* The request line {"id": id, "event": event}\n. */
static int build_request(const fm_fn_pool *p, const char *event_json, const char *id,
                         char **out, size_t *len, fm_errbuf *err)
{
    if (!event_json)
        return fm_errf(err, FM_EINVAL, "function %s: no event", p->spec.name);
    /* The event goes into the line as it is, checked but not re-encoded
     * (re-encoding a measurement with jansson cost more than the call). A
     * raw line break in valid JSON can only be whitespace between tokens,
     * so it becomes a space: the line stays one line, the value the same. */
    size_t elen = strlen(event_json);
    int valid = fn__json_valid(event_json, elen);
    if (valid < 0)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    if (!valid)
        return fm_errf(err, FM_EINVAL, "function %s: the event is not JSON", p->spec.name);
    static const char head[] = "{\"id\":\"";
    static const char mid[] = "\",\"event\":";
    size_t ilen = strlen(id);
    size_t n = sizeof head - 1 + ilen + sizeof mid - 1 + elen + 2; /* "}\n" */
    if (n > FM_FN_LINE_MAX)
        return fm_errf(err, FM_EINVAL, "function %s: the event makes a request line over %d bytes",
                       p->spec.name, FM_FN_LINE_MAX);
    char *s = fm_malloc(n + 1);
    if (!s)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    char *w = s;
    memcpy(w, head, sizeof head - 1);
    w += sizeof head - 1;
    memcpy(w, id, ilen); /* a decimal counter: nothing to escape */
    w += ilen;
    memcpy(w, mid, sizeof mid - 1);
    w += sizeof mid - 1;
    for (size_t i = 0; i < elen; i++)
        *w++ = event_json[i] == '\n' || event_json[i] == '\r' ? ' ' : event_json[i];
    *w++ = '}';
    *w++ = '\n';
    *w = '\0';
    *out = s;
    *len = n;
    return 0;
}

/* Writes the whole request by the deadline, never raising SIGPIPE
 * (fm_write_nopipe). *gone: the worker's input is closed. */
static int write_request(int fd, const char *buf, size_t len, uint64_t deadline,
                         size_t *written, bool *gone)
{
    int rc = 0;
    *written = 0;
    while (*written < len) {
        ssize_t n = fm_write_nopipe(fd, buf + *written, len - *written);
        if (n > 0) {
            *written += (size_t)n;
        } else if (n < 0 && errno == EAGAIN) {
            /* The worker is not reading (yet): the pipe is full. */
            uint64_t now = fm_mono_ns();
            if (now >= deadline) {
                rc = FM_ETIMEDOUT;
                break;
            }
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            if (poll(&pfd, 1, ms_until(deadline, now)) < 0 && errno != EINTR) {
                rc = FM_EIO;
                break;
            }
        } else if (n < 0 && errno == EPIPE) {
            *gone = true;
            rc = FM_EPROTO;
            break;
        } else if (!(n < 0 && errno == EINTR)) {
            rc = FM_EIO;
            break;
        }
    }
    return rc;
}

/* The answer line: 0 with *result, FM_EMODEL with the function's message,
 * FM_EPROTO for anything else. */
static int parse_answer(const fm_fn_pool *p, const char *line, size_t n, const char *id,
                        char **result, fm_errbuf *err)
{
    json_error_t je;
    json_t *ans = json_loadb(line, n, 0, &je);
    const char *aid = json_string_value(json_object_get(ans, "id"));
    json_t *e = json_object_get(ans, "error"), *r = json_object_get(ans, "result");
    int rc;
    size_t len;
    if (!json_is_object(ans)) {
        rc = fm_errf(err, FM_EPROTO, "function %s: the answer is not a JSON object",
                     p->spec.name);
    } else if (!aid || strcmp(aid, id) != 0) {
        rc = fm_errf(err, FM_EPROTO, "function %s: the answer has the wrong id", p->spec.name);
    } else if (e && !json_is_null(e)) {
        char *text = json_is_string(e) ? NULL : dump(e, 0, &len);
        rc = fm_errf(err, FM_EMODEL, "%s", json_is_string(e) ? json_string_value(e)
                                           : text         ? text
                                                          : "(an error)");
        fm_free(text);
    } else if (!r) {
        rc = fm_errf(err, FM_EPROTO, "function %s: the answer has neither result nor error",
                     p->spec.name);
    } else {
        *result = dump(r, 0, &len);
        rc = *result ? 0 : fm_errf(err, FM_ENOMEM, "out of memory");
    }
    json_decref(ans);
    return rc;
}

/* One request and its answer on w, outside the lock. *healthy: the worker
 * answered in protocol and can serve again. *retry: it was gone before it
 * read any of the request, so another worker may take the call. */
static int exchange(fm_fn_pool *p, worker *w, const char *req, size_t reqlen, const char *id,
                    uint64_t deadline, char **result, bool *healthy, bool *retry, fm_errbuf *err)
{
    const char *name = p->spec.name;
    size_t written = 0, n = 0;
    bool eof = false;
    *healthy = *retry = false;
    int rc = write_request(w->in_fd, req, reqlen, deadline, &written, &eof);
    if (rc == 0)
        rc = read_line(w, deadline, &n, &eof);
    if (eof) {
        int unread = -1;
        if (w->len == 0 && ioctl(w->in_fd, FIONREAD, &unread) == 0 && unread >= 0 &&
            (size_t)unread == written)
            *retry = true;
        return fm_errf(err, FM_EPROTO, "function %s: the worker exited", name);
    }
    if (rc == FM_ETIMEDOUT)
        return fm_errf(err, FM_ETIMEDOUT, "function %s: no answer within %d ms", name,
                       p->spec.timeout_ms);
    if (rc == FM_EPROTO)
        return fm_errf(err, FM_EPROTO, "function %s: an answer line over %d bytes", name,
                       FM_FN_LINE_MAX);
    if (rc == FM_ENOMEM)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    if (rc)
        return fm_errf(err, FM_EPROTO, "function %s: talking to the worker: %s", name,
                       strerror(errno));
    rc = parse_answer(p, w->buf, n, id, result, err);
    buf_drop(w, n + 1);
    *healthy = rc == 0 || rc == FM_EMODEL || rc == FM_ENOMEM;
    return rc;
}

/* With mu held: an idle worker, the most recently used first (so the
 * others grow idle and the pool shrinks back), or NULL. */
static worker *pick_idle(fm_fn_pool *p)
{
    for (;;) {
        worker *best = NULL;
        for (int i = 0; i < p->nslots; i++)
            if (p->w[i].state == W_IDLE && (!best || p->w[i].since_ns > best->since_ns))
                best = &p->w[i];
        if (!best || idle_healthy(best))
            return best;
        retire(p, best, true, "exited or wrote while idle");
    }
}

/* With mu held: takes a worker for a call (BUSY), waiting until deadline
 * while asking the maintenance thread for more. */
static int acquire(fm_fn_pool *p, uint64_t deadline, worker **out, fm_errbuf *err)
{
    bool queued = false;
    uint64_t fails0 = p->start_fails, began = fm_mono_ns();
    int rc;
    for (;;) {
        if (p->stopping) {
            rc = fm_errf(err, FM_ESTATE, "function %s: the pool is stopping", p->spec.name);
            break;
        }
        worker *w = pick_idle(p);
        if (w) {
            w->state = W_BUSY;
            *out = w;
            rc = 0;
            /* Latency scaling: a call that waited too long makes the pool
             * keep a spare worker for a while (pool_hot). */
            uint64_t now = fm_mono_ns();
            p->last_wait_us = (int64_t)((now - began) / 1000);
            if (p->spec.target_wait_ms > 0 &&
                now - began > (uint64_t)p->spec.target_wait_ms * NS_PER_MS) {
                p->waited++;
                p->waited_at_ns = now;
                wake_maint(p);
            }
            break;
        }
        uint64_t now = fm_mono_ns();
        /* No worker at all, and none can start now: say why at once rather
         * than at the deadline. */
        if (p->start_rc && live_workers(p) == 0 &&
            (p->start_fails != fails0 || now < p->spawn_after_ns)) {
            rc = fm_errf(err, p->start_rc, "%s", p->start_err.msg);
            break;
        }
        if (now >= deadline) {
            rc = fm_errf(err, FM_ETIMEDOUT, "function %s: no worker free within %d ms",
                         p->spec.name, p->spec.timeout_ms);
            break;
        }
        if (!queued) {
            queued = true;
            p->queued++;
            wake_maint(p);
        }
        wait_until(p, deadline);
    }
    if (queued)
        p->queued--;
    return rc;
}

/* With mu held: counts a finished call. */
static void account(fm_fn_pool *p, int rc, uint64_t us)
{
    if (rc == 0)
        p->calls++;
    else if (rc == FM_EMODEL)
        p->errors++;
    else if (rc == FM_ESTATE || rc == FM_ENOMEM)
        return;
    else
        p->failures++;
    int b = 0;
    while (b < 11 && (int64_t)us > fm_fn_buckets_us[b])
        b++;
    p->duration_us[b]++;
    p->duration_sum_us += us;
}

int fm_fn_call(fm_fn_pool *p, const char *event_json, char **result, int64_t *duration_us,
               fm_errbuf *err)
{
    *result = NULL;
    if (duration_us)
        *duration_us = 0;
    uint64_t t0 = fm_mono_ns();
    uint64_t deadline = t0 + (uint64_t)p->spec.timeout_ms * NS_PER_MS;
    char id[24];
    snprintf(id, sizeof id, "%llu", (unsigned long long)(atomic_fetch_add(&p->next_id, 1) + 1));
    char *req = NULL;
    size_t reqlen = 0;
    int rc = build_request(p, event_json, id, &req, &reqlen, err);
    if (rc)
        return rc;
    fm_errbuf e = {{0}};
    pthread_mutex_lock(&p->mu);
    if (p->stopping) {
        pthread_mutex_unlock(&p->mu);
        fm_free(req);
        return fm_errf(err, FM_ESTATE, "function %s: the pool is stopping", p->spec.name);
    }
    p->active++;
    for (int attempt = 0;; attempt++) {
        worker *w = NULL;
        rc = acquire(p, deadline, &w, &e);
        if (rc)
            break;
        pthread_mutex_unlock(&p->mu);
        bool healthy, retry;
        rc = exchange(p, w, req, reqlen, id, deadline, result, &healthy, &retry, &e);
        pthread_mutex_lock(&p->mu);
        if (p->stopping) {
            retire(p, w, false, NULL);
        } else if (healthy) {
            w->state = W_IDLE;
            w->since_ns = fm_mono_ns();
            pthread_cond_broadcast(&p->cv);
        } else {
            retire(p, w, true, e.msg);
        }
        if (p->stopping && rc != 0 && rc != FM_EMODEL) {
            rc = fm_errf(&e, FM_ESTATE, "function %s: the pool is stopping", p->spec.name);
            break;
        }
        if (!retry || attempt >= CALL_RETRIES)
            break;
    }
    uint64_t us = (fm_mono_ns() - t0) / 1000;
    account(p, rc, us);
    p->active--;
    if (p->stopping)
        pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    fm_free(req);
    if (duration_us)
        *duration_us = (int64_t)us;
    if (rc)
        fm_errf(err, rc, "%s", e.msg);
    return rc;
}

/* ---- the pool ------------------------------------------------------------------- */

static bool name_ok(const char *s)
{
    size_t n = strnlen(s, FM_FN_NAME_MAX + 1);
    if (n == 0 || n > FM_FN_NAME_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              (i > 0 && (c == '-' || c == '_'))))
            return false;
    }
    return true;
}

static int check_spec(const fm_fn_spec *s, fm_errbuf *err)
{
    if (!name_ok(s->name))
        return fm_errf(err, FM_EINVAL, "a function name is [a-z0-9][a-z0-9_-]*, at most %d long",
                       FM_FN_NAME_MAX);
    const struct {
        const char *what;
        int v, lo, hi;
    } ranges[] = {
        {"max_workers", s->max_workers, 1, 64},
        {"min_workers", s->min_workers, 0, s->max_workers},
        {"timeout_ms", s->timeout_ms, 1, 600000},
        {"start_timeout_ms", s->start_timeout_ms, 1, 600000},
        {"idle_ms", s->idle_ms, 1, 86400000},
        {"memory_mb", s->memory_mb, 16, 65536},
        {"cpu_s", s->cpu_s, 1, 86400},
    };
    for (size_t i = 0; i < sizeof ranges / sizeof ranges[0]; i++)
        if (ranges[i].v < ranges[i].lo || ranges[i].v > ranges[i].hi)
            return fm_errf(err, FM_EINVAL, "function %s: %s must be in %d..%d", s->name,
                           ranges[i].what, ranges[i].lo, ranges[i].hi);
    if (!s->command || s->command[0] != '/')
        return fm_errf(err, FM_EINVAL, "function %s: command must be an absolute path", s->name);
    return 0;
}

static void pool_free(fm_fn_pool *p)
{
    for (int i = 0; p->w && i < p->nslots; i++)
        slot_free(&p->w[i]);
    fm_free(p->w);
    fm_free(p->pfds);
    fm_free(p->pslot);
    fn__sandbox_free(&p->sb);
    if (p->wake_fd >= 0)
        close(p->wake_fd);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    fm_free(p);
}

int fm_fn_pool_start(const fm_fn_spec *spec, fm_fn_pool **out, fm_errbuf *err)
{
    *out = NULL;
    int rc = check_spec(spec, err);
    if (rc)
        return rc;
    fm_fn_pool *p = fm_calloc(1, sizeof *p);
    if (!p)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    bool cv_ok = pthread_cond_init(&p->cv, &ca) == 0;
    pthread_condattr_destroy(&ca);
    if (!cv_ok || pthread_mutex_init(&p->mu, NULL) != 0) {
        if (cv_ok)
            pthread_cond_destroy(&p->cv);
        fm_free(p);
        return fm_errf(err, FM_ENOMEM, "out of memory");
    }
    p->wake_fd = -1;
    p->spec = *spec;
    /* The strings are the caller's; the sandbox has its own copies. */
    p->spec.command = NULL;
    memset(p->spec.args, 0, sizeof p->spec.args);
    memset(p->spec.env, 0, sizeof p->spec.env);
    p->spec.log_dir = NULL;
    p->spec.bwrap = NULL;
    p->nslots = 2 * spec->max_workers;
    p->w = fm_calloc((size_t)p->nslots, sizeof *p->w);
    p->pfds = fm_calloc((size_t)p->nslots + 1, sizeof *p->pfds);
    p->pslot = fm_calloc((size_t)p->nslots + 1, sizeof *p->pslot);
    if (!p->w || !p->pfds || !p->pslot) {
        pool_free(p);
        return fm_errf(err, FM_ENOMEM, "out of memory");
    }
    for (int i = 0; i < p->nslots; i++)
        p->w[i].in_fd = p->w[i].out_fd = -1;
    rc = fn__sandbox_init(&p->sb, spec, err);
    if (rc) {
        pool_free(p);
        return rc;
    }
    p->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (p->wake_fd < 0) {
        rc = fm_errf(err, FM_EIO, "eventfd: %s", strerror(errno));
        pool_free(p);
        return rc;
    }
    char tname[16];
    snprintf(tname, sizeof tname, "fn-%.12s", p->spec.name);
    if (fm_thread_start(&p->maint, tname, maint_main, p) != 0) {
        pool_free(p);
        return fm_errf(err, FM_ENOMEM, "function %s: cannot start its thread", spec->name);
    }
    /* min_workers must get ready; each start has its own deadline, so the
     * limit here only guards against a worker that keeps dying after it
     * got ready. */
    pthread_mutex_lock(&p->mu);
    uint64_t limit = fm_mono_ns() + ((uint64_t)spec->start_timeout_ms + 5000) * NS_PER_MS;
    for (;;) {
        int starting, idle, busy;
        count_live(p, &starting, &idle, &busy);
        if (p->start_fails > 0) {
            rc = fm_errf(err, p->start_rc ? p->start_rc : FM_EPROTO, "%s", p->start_err.msg);
            break;
        }
        if (idle >= spec->min_workers)
            break;
        if (fm_mono_ns() >= limit) {
            rc = fm_errf(err, FM_ETIMEDOUT, "function %s: %d workers did not get ready",
                         spec->name, spec->min_workers);
            break;
        }
        wait_until(p, limit);
    }
    pthread_mutex_unlock(&p->mu);
    if (rc) {
        fm_fn_pool_stop(p);
        return rc;
    }
    char n[16];
    snprintf(n, sizeof n, "%d", spec->min_workers);
    fm_logkv(FM_LOG_INFO, "functions", "pool started", "function", spec->name, "workers", n,
             NULL);
    *out = p;
    return 0;
}

void fm_fn_pool_stats(fm_fn_pool *p, fm_fn_stats *out)
{
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&p->mu);
    int starting, idle, busy;
    count_live(p, &starting, &idle, &busy);
    out->workers = starting + idle + busy;
    out->busy = busy;
    out->queued = p->queued;
    out->calls = p->calls;
    out->errors = p->errors;
    out->failures = p->failures;
    out->starts = p->starts;
    out->crashes = p->crashes;
    out->last_start_ms = p->last_start_ms;
    memcpy(out->duration_us, p->duration_us, sizeof out->duration_us);
    out->duration_sum_us = p->duration_sum_us;
    out->waited = p->waited;
    out->last_wait_us = p->last_wait_us;
    out->hot = pool_hot(p, fm_mono_ns());
    pthread_mutex_unlock(&p->mu);
}

void fm_fn_pool_stop(fm_fn_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->stopping = true;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    wake_maint(p);
    /* The thread ends the workers and waits for the callers (shut_down). */
    fm_thread_stop(&p->maint);
    pool_free(p);
}
