/*
 * The functions of a node (fm_fn_registry, fleetml/functions.h): one warm
 * pool per deployed directory <functions dir>/<name>/, started with the
 * node. A function whose settings are wrong or whose workers do not get
 * ready is logged and left out, so one broken deployment never stops the
 * node or the other functions.
 */
#include "fleetml/functions.h"
#include "fleetml/metrics.h"

#include <dirent.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REG_MAX 64

typedef struct processor {
    char kind[64];
    char groups[8][65]; /* "*": every group */
    size_t ngroups;
} processor;

struct fm_fn_registry {
    fm_fn_pool *pools[REG_MAX];
    processor procs[REG_MAX]; /* procs[i] belongs to pools[i]; ngroups 0: none */
    size_t n;
};

static bool fn_name_ok(const char *s)
{
    size_t n = strlen(s);
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

/* An optional integer field within [lo, hi]. */
static int int_field(json_t *doc, const char *key, int lo, int hi, int *out, fm_errbuf *err)
{
    json_t *v = json_object_get(doc, key);
    if (!v)
        return 0;
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
        return fm_errf(err, FM_EINVAL, "%s must be an integer in %d..%d", key, lo, hi);
    *out = (int)json_integer_value(v);
    return 0;
}

/* Adds NAME=value for each string member of obj (env or secrets). */
static int env_from(json_t *obj, const char *what, char **env_buf, size_t env_cap, size_t *n,
                    fm_errbuf *err)
{
    if (!obj)
        return 0;
    if (!json_is_object(obj))
        return fm_errf(err, FM_EINVAL, "%s must be an object of strings", what);
    const char *k;
    json_t *v;
    json_object_foreach(obj, k, v) {
        if (!json_is_string(v) || !*k || strchr(k, '='))
            return fm_errf(err, FM_EINVAL, "%s.%s must be a string (names without '=')", what, k);
        if (*n >= env_cap)
            return fm_errf(err, FM_EINVAL, "at most %zu environment variables", env_cap);
        size_t len = strlen(k) + strlen(json_string_value(v)) + 2;
        char *e = fm_malloc(len);
        if (!e)
            return fm_errf(err, FM_ENOMEM, "out of memory");
        snprintf(e, len, "%s=%s", k, json_string_value(v));
        env_buf[(*n)++] = e;
    }
    return 0;
}

int fm_fn_spec_from_json(const char *dir, const char *name, json_t *doc, fm_fn_spec *spec,
                         char *command, size_t command_len, char **env_buf, size_t env_cap,
                         fm_errbuf *err)
{
    static const char *const keys[] = {"command",  "args",      "min_workers", "max_workers",
                                       "timeout_ms", "memory_mb", "cpu_s",       "idle_ms",
                                       "network",  "env",       "secrets",     "processor",
                                       "target_wait_ms", NULL};
    fm_fn_spec_defaults(spec);
    if (!json_is_object(doc))
        return fm_errf(err, FM_EINVAL, "function.json must be a JSON object");
    if (!fn_name_ok(name))
        return fm_errf(err, FM_EINVAL, "'%s' is not a function name ([a-z0-9][a-z0-9_-]*)", name);
    const char *k;
    json_t *v;
    json_object_foreach(doc, k, v) {
        bool known = false;
        for (size_t i = 0; keys[i]; i++)
            known = known || strcmp(keys[i], k) == 0;
        if (!known)
            return fm_errf(err, FM_EINVAL, "unknown field '%s'", k);
    }
    snprintf(spec->name, sizeof spec->name, "%s", name);
    const char *cmd = json_string_value(json_object_get(doc, "command"));
    if (!cmd || !*cmd || strchr(cmd, '/'))
        return fm_errf(err, FM_EINVAL, "command must name a file of the function's directory");
    if ((size_t)snprintf(command, command_len, "%s/%s", dir, cmd) >= command_len)
        return fm_errf(err, FM_EINVAL, "command: path too long");
    spec->command = command;
    json_t *args = json_object_get(doc, "args");
    if (args && (!json_is_array(args) || json_array_size(args) >= 8))
        return fm_errf(err, FM_EINVAL, "args must be an array of at most 7 strings");
    for (size_t i = 0; args && i < json_array_size(args); i++) {
        spec->args[i] = json_string_value(json_array_get(args, i));
        if (!spec->args[i])
            return fm_errf(err, FM_EINVAL, "args must be strings");
    }
    int rc = int_field(doc, "max_workers", 1, 64, &spec->max_workers, err);
    if (!rc)
        rc = int_field(doc, "min_workers", 0, spec->max_workers, &spec->min_workers, err);
    if (!rc)
        rc = int_field(doc, "timeout_ms", 1, 600000, &spec->timeout_ms, err);
    if (!rc)
        rc = int_field(doc, "memory_mb", 16, 65536, &spec->memory_mb, err);
    if (!rc)
        rc = int_field(doc, "cpu_s", 1, 86400, &spec->cpu_s, err);
    if (!rc)
        rc = int_field(doc, "idle_ms", 100, 86400000, &spec->idle_ms, err);
    if (!rc)
        rc = int_field(doc, "target_wait_ms", 0, 600000, &spec->target_wait_ms, err);
    if (rc)
        return rc;
    json_t *net = json_object_get(doc, "network");
    if (net && !json_is_boolean(net))
        return fm_errf(err, FM_EINVAL, "network must be true or false");
    spec->network = json_is_true(net);
    size_t n = 0;
    rc = env_from(json_object_get(doc, "env"), "env", env_buf, env_cap, &n, err);
    if (!rc)
        rc = env_from(json_object_get(doc, "secrets"), "secrets", env_buf, env_cap, &n, err);
    for (size_t i = 0; i < n && i < FM_FN_ENV_MAX; i++)
        spec->env[i] = env_buf[i];
    return rc;
}

/* "processor": {"kind": "viscosity.sweep.v1", "groups": ["research", ...]}. */
static int processor_from_json(json_t *doc, processor *out, fm_errbuf *err)
{
    memset(out, 0, sizeof *out);
    json_t *pj = json_object_get(doc, "processor");
    if (!pj)
        return 0;
    const char *kind = json_string_value(json_object_get(pj, "kind"));
    json_t *groups = json_object_get(pj, "groups");
    if (!json_is_object(pj) || json_object_size(pj) != 2 || !kind ||
        strcmp(kind, "viscosity.sweep.v1") != 0 || !json_is_array(groups) ||
        json_array_size(groups) == 0 || json_array_size(groups) > 8)
        return fm_errf(err, FM_EINVAL,
                       "processor must be {\"kind\": \"viscosity.sweep.v1\", \"groups\": [1..8 "
                       "device groups, or \"*\"]}");
    snprintf(out->kind, sizeof out->kind, "%s", kind);
    for (size_t i = 0; i < json_array_size(groups); i++) {
        const char *g = json_string_value(json_array_get(groups, i));
        if (!g || !*g || strlen(g) > 64)
            return fm_errf(err, FM_EINVAL, "processor.groups: device group names");
        snprintf(out->groups[out->ngroups++], sizeof out->groups[0], "%s", g);
    }
    return 0;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(fm_fn_pool_name(*(fm_fn_pool *const *)a),
                  fm_fn_pool_name(*(fm_fn_pool *const *)b));
}

/* Starts the function in dir/name; logged and skipped on any problem. */
static void load_one(fm_fn_registry *r, const char *dir, const char *name, const char *log_dir)
{
    char fdir[PATH_MAX], path[PATH_MAX + 16], command[PATH_MAX];
    fm_errbuf err = {0};
    if ((size_t)snprintf(fdir, sizeof fdir, "%s/%s", dir, name) >= sizeof fdir)
        return;
    snprintf(path, sizeof path, "%s/function.json", fdir);
    json_error_t jerr;
    json_t *doc = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!doc) {
        fm_logkv(FM_LOG_WARN, "functions", "function left out: unreadable function.json",
                 "function", name, "error", jerr.text, NULL);
        return;
    }
    char *env[FM_FN_ENV_MAX] = {0};
    fm_fn_spec spec;
    int rc = fm_fn_spec_from_json(fdir, name, doc, &spec, command, sizeof command, env,
                                  FM_FN_ENV_MAX, &err);
    spec.log_dir = log_dir;
    fm_fn_pool *p = NULL;
    processor proc;
    if (!rc)
        rc = processor_from_json(doc, &proc, &err);
    if (!rc)
        rc = fm_fn_pool_start(&spec, &p, &err);
    for (size_t i = 0; i < FM_FN_ENV_MAX; i++)
        fm_free(env[i]);
    json_decref(doc);
    if (rc) {
        fm_logkv(FM_LOG_WARN, "functions", "function left out", "function", name, "error",
                 err.msg, NULL);
        return;
    }
    r->procs[r->n] = proc;
    r->pools[r->n++] = p;
    fm_logkv(FM_LOG_INFO, "functions", "function ready", "function", name, NULL);
}

/* The pools' counters in /metrics, one series per function. */
static void render(void *ud, fm_strbuf *b)
{
    fm_fn_registry *r = ud;
    fm_fn_stats st[REG_MAX];
    for (size_t i = 0; i < r->n; i++)
        fm_fn_pool_stats(r->pools[i], &st[i]);
    fm_strbuf_printf(b, "# HELP fleetml_function_calls_total Calls of a function, by outcome "
                        "(error: the function answered an error; failure: no valid answer in "
                        "time, the worker was replaced).\n"
                        "# TYPE fleetml_function_calls_total counter\n");
    for (size_t i = 0; i < r->n; i++) {
        const char *n = fm_fn_pool_name(r->pools[i]);
        fm_strbuf_printf(b,
                         "fleetml_function_calls_total{function=\"%s\",outcome=\"ok\"} %llu\n"
                         "fleetml_function_calls_total{function=\"%s\",outcome=\"error\"} %llu\n"
                         "fleetml_function_calls_total{function=\"%s\",outcome=\"failure\"} %llu\n",
                         n, (unsigned long long)st[i].calls, n, (unsigned long long)st[i].errors, n,
                         (unsigned long long)st[i].failures);
    }
    fm_strbuf_printf(b, "# HELP fleetml_function_workers Workers of a function, by state.\n"
                        "# TYPE fleetml_function_workers gauge\n");
    for (size_t i = 0; i < r->n; i++) {
        const char *n = fm_fn_pool_name(r->pools[i]);
        fm_strbuf_printf(b,
                         "fleetml_function_workers{function=\"%s\",state=\"running\"} %d\n"
                         "fleetml_function_workers{function=\"%s\",state=\"busy\"} %d\n"
                         "fleetml_function_queue{function=\"%s\"} %d\n",
                         n, st[i].workers, n, st[i].busy, n, st[i].queued);
    }
    fm_strbuf_printf(b, "# HELP fleetml_function_waited_total Calls that waited longer than "
                        "the function's target_wait_ms for a worker (latency scaling).\n"
                        "# TYPE fleetml_function_waited_total counter\n");
    for (size_t i = 0; i < r->n; i++)
        fm_strbuf_printf(b, "fleetml_function_waited_total{function=\"%s\"} %llu\n",
                         fm_fn_pool_name(r->pools[i]), (unsigned long long)st[i].waited);
    fm_strbuf_printf(b, "# HELP fleetml_function_start_seconds How long the newest worker of a "
                        "function took to get ready (a cold start).\n"
                        "# TYPE fleetml_function_start_seconds gauge\n");
    for (size_t i = 0; i < r->n; i++)
        fm_strbuf_printf(b, "fleetml_function_start_seconds{function=\"%s\"} %.3f\n",
                         fm_fn_pool_name(r->pools[i]), (double)st[i].last_start_ms / 1000.0);
    fm_strbuf_printf(b, "# HELP fleetml_function_seconds Duration of function calls.\n"
                        "# TYPE fleetml_function_seconds histogram\n");
    for (size_t i = 0; i < r->n; i++) {
        const char *n = fm_fn_pool_name(r->pools[i]);
        uint64_t cum = 0;
        for (int k = 0; k < 12; k++) {
            cum += st[i].duration_us[k];
            if (k < 11)
                fm_strbuf_printf(b, "fleetml_function_seconds_bucket{function=\"%s\",le=\"%g\"} %llu\n",
                                 n, (double)fm_fn_buckets_us[k] / 1e6, (unsigned long long)cum);
            else
                fm_strbuf_printf(b, "fleetml_function_seconds_bucket{function=\"%s\",le=\"+Inf\"} %llu\n",
                                 n, (unsigned long long)cum);
        }
        fm_strbuf_printf(b, "fleetml_function_seconds_sum{function=\"%s\"} %.6f\n"
                            "fleetml_function_seconds_count{function=\"%s\"} %llu\n",
                         n, (double)st[i].duration_sum_us / 1e6, n, (unsigned long long)cum);
    }
}

int fm_fn_registry_open(const char *dir, const char *log_dir, fm_fn_registry **out,
                        fm_errbuf *err)
{
    fm_fn_registry *r = fm_calloc(1, sizeof *r);
    if (!r)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    DIR *d = dir && *dir ? opendir(dir) : NULL;
    for (struct dirent *e; d && (e = readdir(d)) != NULL && r->n < REG_MAX;) {
        if (e->d_name[0] == '.')
            continue;
        load_one(r, dir, e->d_name, log_dir);
    }
    if (d)
        closedir(d);
    /* Name order (listings, and which processor wins), procs kept beside
     * their pools: an insertion sort of both arrays (a handful of entries). */
    for (size_t i = 1; i < r->n; i++)
        for (size_t j = i; j > 0 && by_name(&r->pools[j - 1], &r->pools[j]) > 0; j--) {
            fm_fn_pool *tp = r->pools[j];
            r->pools[j] = r->pools[j - 1];
            r->pools[j - 1] = tp;
            processor tq = r->procs[j];
            r->procs[j] = r->procs[j - 1];
            r->procs[j - 1] = tq;
        }
    if (r->n)
        fm_metrics_add_source(render, r);
    *out = r;
    return 0;
}

fm_fn_pool *fm_fn_registry_get(fm_fn_registry *r, const char *name)
{
    for (size_t i = 0; r && name && i < r->n; i++)
        if (strcmp(fm_fn_pool_name(r->pools[i]), name) == 0)
            return r->pools[i];
    return NULL;
}

fm_fn_pool *fm_fn_registry_processor(fm_fn_registry *r, const char *kind, const char *group)
{
    for (size_t i = 0; r && i < r->n; i++) {
        const processor *p = &r->procs[i];
        if (!p->ngroups || strcmp(p->kind, kind) != 0)
            continue;
        for (size_t g = 0; g < p->ngroups; g++)
            if (strcmp(p->groups[g], "*") == 0 || strcmp(p->groups[g], group ? group : "") == 0)
                return r->pools[i];
    }
    return NULL;
}

void fm_fn_registry_each(fm_fn_registry *r, void (*cb)(void *ud, fm_fn_pool *p), void *ud)
{
    for (size_t i = 0; r && i < r->n; i++)
        cb(ud, r->pools[i]);
}

void fm_fn_registry_close(fm_fn_registry *r)
{
    if (!r)
        return;
    fm_metrics_remove_source(render, r);
    for (size_t i = 0; i < r->n; i++)
        fm_fn_pool_stop(r->pools[i]);
    fm_free(r);
}

json_t *fm_fn_pool_json(fm_fn_pool *p)
{
    fm_fn_stats s;
    fm_fn_pool_stats(p, &s);
    return json_pack("{s:s,s:i,s:i,s:i,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:b}", "name",
                     fm_fn_pool_name(p), "workers", s.workers, "busy", s.busy, "queued",
                     s.queued, "calls", (json_int_t)s.calls, "errors", (json_int_t)s.errors,
                     "failures", (json_int_t)s.failures, "starts", (json_int_t)s.starts,
                     "crashes", (json_int_t)s.crashes, "last_start_ms",
                     (json_int_t)s.last_start_ms, "waited", (json_int_t)s.waited,
                     "last_wait_us", (json_int_t)s.last_wait_us, "scaling_ahead", s.hot);
}
