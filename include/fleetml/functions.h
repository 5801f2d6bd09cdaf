/*
 * Functions: anyone's code, kept warm and sandboxed (docs/functions.md).
 *
 * A function is an executable in any language. fleetml keeps a pool of its
 * workers running and hands each one event at a time, so a call costs a
 * pipe round trip, never a process start:
 *
 *   worker -> fleetml   {"ready": true}                          once, at start
 *   fleetml -> worker   {"id": "<call id>", "event": {...}}       one line per call
 *   worker -> fleetml   {"id": "<call id>", "result": <any JSON>} one line, or
 *                       {"id": "<call id>", "error": "<message>"}
 *
 * Lines are UTF-8 JSON ended by "\n", at most FM_FN_LINE_MAX bytes. A worker
 * answers calls in order, one at a time; what it writes to stderr goes to
 * <data>/functions/<name>.log (it is the function's own log).
 *
 * Each worker runs under bubblewrap (bwrap) as an unprivileged user (65534)
 * in new namespaces: the file system is read-only (/usr, and the function's
 * own directory mounted at /fn), /tmp is a private tmpfs, /etc and /home
 * are absent, the environment is only what the function's settings give
 * it; without `network` it has no network namespace of its own to reach
 * anything and a seccomp filter refuses socket() for every address family
 * but AF_UNIX. rlimits bound its address space (memory_mb), CPU seconds
 * over its life (cpu_s), open files and processes.
 *
 * A worker that exits, answers garbage (not JSON, wrong id, a line too
 * long) or does not answer within timeout_ms is killed and replaced; the
 * call fails with FM_EPROTO / FM_ETIMEDOUT and the caller decides whether
 * to retry (the rules engine does, with backoff). A worker that answers
 * {"error": ...} stays: that call fails with FM_EMODEL (see fm_fn_call).
 *
 * Scaling: min_workers are started with the pool and kept (a crashed one
 * is replaced). A call that finds every worker busy starts one more, up to
 * max_workers, and otherwise waits (that wait is the queue depth); a
 * worker above min_workers idle for idle_ms is stopped.
 */
#ifndef FLEETML_FUNCTIONS_H
#define FLEETML_FUNCTIONS_H

#include "fleetml/core.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct json_t;

#define FM_FN_NAME_MAX 64
#define FM_FN_ENV_MAX 32
#define FM_FN_LINE_MAX (1 << 20) /* one request or answer line */

/* What a function is and how it runs. Strings are copied by
 * fm_fn_pool_start. */
typedef struct fm_fn_spec {
    char name[FM_FN_NAME_MAX + 1]; /* [a-z0-9][a-z0-9_-]*, names its log and metrics */
    const char *command;  /* absolute path of the executable; its directory is /fn */
    const char *args[8];  /* extra arguments, NULL-terminated (may be all NULL) */
    const char *env[FM_FN_ENV_MAX + 1]; /* "NAME=value", NULL-terminated; secrets too
                                           (never logged) */
    int min_workers;      /* 0..max_workers */
    int max_workers;      /* 1..64 */
    int timeout_ms;       /* per call, 1..600000 */
    int start_timeout_ms; /* until the ready line, 1..600000 */
    int idle_ms;          /* a worker above min idle this long is stopped */
    int target_wait_ms;   /* latency scaling: when a call waited longer than this for
                             a worker within idle_ms, one spare worker is kept ready
                             beyond the busy ones; 0 turns it off */
    int memory_mb;        /* RLIMIT_AS of a worker, 16..65536 */
    int cpu_s;            /* RLIMIT_CPU of a worker's life, 1..86400 */
    bool network;         /* share the host's network (and allow sockets) */
    const char *log_dir;  /* where <name>.log goes (created); NULL: stderr discarded */
    const char *bwrap;    /* the bwrap binary; NULL: "bwrap" from PATH */
} fm_fn_spec;

/* Defaults for everything but name and command (min 1, max 4, 5 s per
 * call, 10 s to start, idle 60 s, target wait 10 ms, 256 MB, 60 CPU s, no
 * network). */
void fm_fn_spec_defaults(fm_fn_spec *spec);

/* Counters of one pool, for metrics and `GET /functions`. */
typedef struct fm_fn_stats {
    int workers;           /* running now */
    int busy;              /* handling a call now */
    int queued;            /* calls waiting for a worker now */
    uint64_t calls;        /* calls answered with a result */
    uint64_t errors;       /* calls answered with an error by the function */
    uint64_t failures;     /* calls that timed out or got garbage, or could not start a worker */
    uint64_t starts;       /* workers started */
    uint64_t crashes;      /* workers that exited or were killed while in use */
    int64_t last_start_ms; /* how long the last worker took from spawn to ready */
    uint64_t duration_us[12]; /* histogram of call durations, buckets fm_fn_buckets_us */
    uint64_t duration_sum_us;
    uint64_t waited;          /* calls that waited longer than target_wait_ms */
    int64_t last_wait_us;     /* how long the last call waited for a worker */
    bool hot;                 /* latency scaling keeps a spare worker now */
} fm_fn_stats;

/* Upper bounds (µs) of the duration histogram's buckets; the last is +Inf. */
extern const int64_t fm_fn_buckets_us[12];

typedef struct fm_fn_pool fm_fn_pool;

/* Starts a pool: checks the spec (FM_EINVAL with the reason), that command
 * is an executable regular file (FM_ENOTFOUND) and bwrap can be run, then
 * starts min_workers workers and waits for their ready lines. A worker
 * that does not get ready fails the start (FM_ETIMEDOUT / FM_EPROTO, the
 * reason in err) and nothing is left running. *out is the caller's, to
 * fm_fn_pool_stop. */
int fm_fn_pool_start(const fm_fn_spec *spec, fm_fn_pool **out, fm_errbuf *err);

/* Calls the function with event_json (a JSON value's text; the request
 * line carries it as "event") and waits for the answer. Thread-safe; calls
 * run in parallel on different workers. On 0, *result is the fm_malloc'd
 * text of the answer's "result" (the caller frees it). Otherwise *result
 * is NULL and:
 *   FM_EMODEL     the function answered {"error": msg}: msg is in err (the
 *                 worker stays);
 *   FM_ETIMEDOUT  no answer within timeout_ms, or no worker free or
 *                 startable within it: the worker (if any) was killed and
 *                 is replaced;
 *   FM_EPROTO     the worker answered garbage or exited: killed, replaced;
 *   FM_EINVAL     event_json is not JSON, or the line would be too long;
 *   FM_ESTATE     the pool is stopping;
 *   FM_ENOMEM.
 * *duration_us (may be NULL) gets the call's duration. */
int fm_fn_call(fm_fn_pool *p, const char *event_json, char **result, int64_t *duration_us,
               fm_errbuf *err);

/* Copies the pool's counters (thread-safe). */
void fm_fn_pool_stats(fm_fn_pool *p, fm_fn_stats *out);

/* The spec's name (static for the pool's life). */
const char *fm_fn_pool_name(const fm_fn_pool *p);

/* Ends calls in progress (they fail with FM_ESTATE), stops every worker
 * (its input ends, then SIGKILL after 2 s: a SIGTERM to bwrap would kill
 * the sandbox at once) and frees the pool. NULL is a no-op. */
void fm_fn_pool_stop(fm_fn_pool *p);

/* ---- the functions of a node ------------------------------------------------
 * A function is deployed as a directory <functions dir>/<name>/ holding its
 * executable and function.json (mode 0600 when it holds secrets):
 *
 *   {"command": "notify.py", "args": [], "min_workers": 1, "max_workers": 4,
 *    "timeout_ms": 5000, "memory_mb": 256, "cpu_s": 60, "idle_ms": 60000,
 *    "network": false, "env": {"WARD": "icu"}, "secrets": {"TOKEN": "..."},
 *    "processor": {"kind": "viscosity.sweep.v1", "groups": ["research"]}}
 *
 * With "processor", the function answers the devices of those groups in
 * the reply path instead of the model: called warm with the measurement
 * and its features ({"measurement": {...}, "features": {name: value}}),
 * it answers {"outputs": {name: number}} with every output of the served
 * model; the result is stored with the measurement and then sent, as the
 * model's would be.
 *
 * command is relative to the directory; env and secrets both become the
 * worker's environment (secrets are never logged or shown by the API).
 * Every node of a cluster needs the same directories (deploy them as you
 * deploy the binary). */

typedef struct fm_fn_registry fm_fn_registry;

/* Reads every <dir>/<name>/function.json and starts its pool (stderr logs
 * under log_dir). A function that cannot start is logged and left out
 * (the others run); a missing dir is an empty registry. 0 with *out, or
 * FM_ENOMEM. */
int fm_fn_registry_open(const char *dir, const char *log_dir, fm_fn_registry **out,
                        fm_errbuf *err);
/* The pool of function name, or NULL (borrowed: lives until close). */
fm_fn_pool *fm_fn_registry_get(fm_fn_registry *r, const char *name);
/* Calls cb for each running pool, in name order. */
void fm_fn_registry_each(fm_fn_registry *r, void (*cb)(void *ud, fm_fn_pool *p), void *ud);
/* The function that processes the measurements of kind from devices of
 * group (function.json "processor": {"kind": ..., "groups": [...]}, "*"
 * for every group), or NULL. The first in name order wins. */
fm_fn_pool *fm_fn_registry_processor(fm_fn_registry *r, const char *kind, const char *group);
/* Stops every pool and frees the registry. NULL is a no-op. */
void fm_fn_registry_close(fm_fn_registry *r);

/* Parses a function.json document into spec (strings point into doc, which
 * must outlive spec; env entries are built into env_buf, an array of
 * env_cap strings the caller frees with fm_free each). dir is the
 * function's directory; name its name. 0 or FM_EINVAL with the field. */
int fm_fn_spec_from_json(const char *dir, const char *name, struct json_t *doc,
                         fm_fn_spec *spec, char *command, size_t command_len, char **env_buf,
                         size_t env_cap, fm_errbuf *err);

struct json_t;
/* A pool's counters as the API (schema FunctionInfo) and `fleetml function
 * list --json` show them. New reference; NULL when out of memory. */
struct json_t *fm_fn_pool_json(fm_fn_pool *p);

#endif
