/*
 * `fleetml bench pipeline`: the measurement pipeline in-process, without
 * the network: N simulated measurements go through validate -> dedupe ->
 * features -> inference -> group commit -> reply (to a counting publisher).
 * It isolates the cost of fleetml's own work from the broker's, and is the
 * run to profile (valgrind --tool=callgrind fleetml bench pipeline ...).
 * Prints one JSON line.
 */
#include "cli/cli.h"
#include "fleetml/functions.h"
#include "fleetml/measurement.h"
#include "fleetml/metrics.h"
#include "fleetml/model.h"
#include "fleetml/pipeline.h"
#include "fleetml/store.h"
#include "fleetml/viscometer.h"

#include <ftw.h>
#include <jansson.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

typedef struct counter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t replies, ok;
} counter;

static int count_reply(void *ud, const char *topic, const void *payload, size_t len,
                       const void *corr, size_t corr_len)
{
    (void)topic;
    (void)corr;
    (void)corr_len;
    counter *c = ud;
    int ok = memmem(payload, len, "\"status\":\"ok\"", 13) != NULL;
    pthread_mutex_lock(&c->mu);
    c->replies++;
    c->ok += (uint64_t)ok;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
    return 0;
}

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static double thread_cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* CPU µs per measurement of parse + validate and of feature extraction,
 * over n parses of the pool (the pipeline's first stage, without queues). */
static void stage_costs(char *const *pool, const size_t *pool_len, int npool, uint64_t n,
                        double *parse_us, double *features_us)
{
    double parse = 0, feat = 0;
    for (uint64_t i = 0; i < n; i++) {
        fm_measurement m;
        fm_verr e;
        float f[FM_FEATURES_MAX];
        double t0 = thread_cpu_s();
        int rc = fm_measurement_parse(pool[i % (uint64_t)npool], pool_len[i % (uint64_t)npool],
                                      &m, &e);
        double t1 = thread_cpu_s();
        if (rc == 0)
            (void)fm_features_extract(&m, f, &e);
        double t2 = thread_cpu_s();
        parse += t1 - t0;
        feat += t2 - t1;
        fm_measurement_free(&m);
    }
    *parse_us = parse * 1e6 / (double)n;
    *features_us = feat * 1e6 / (double)n;
}

/* CPU µs of one model call for a single row: what a measurement that
 * arrives alone (any quiet moment) pays for inference. -1 if the model
 * cannot be loaded. */
static double predict_one_cost(const char *model_dir, char *const *pool, const size_t *pool_len,
                               int npool)
{
    fm_model *model;
    fm_errbuf err;
    if (fm_model_load(model_dir, &model, &err) != 0)
        return -1;
    enum { CALLS = 4000 };
    size_t nf = fm_feature_count();
    float *feat = fm_calloc((size_t)npool * nf, sizeof *feat);
    int ok = feat != NULL;
    for (int i = 0; ok && i < npool; i++) {
        fm_measurement m;
        fm_verr e;
        ok = fm_measurement_parse(pool[i], pool_len[i], &m, &e) == 0 &&
             fm_features_extract(&m, feat + (size_t)i * nf, &e) == 0;
        fm_measurement_free(&m);
    }
    double t0 = thread_cpu_s();
    for (int i = 0; ok && i < CALLS; i++) {
        float out[FM_OUTPUTS_MAX];
        ok = fm_model_predict(model, feat + (size_t)(i % npool) * nf, 1, out, &err) == 0;
    }
    double cost = ok ? (thread_cpu_s() - t0) * 1e6 / CALLS : -1;
    fm_free(feat);
    fm_model_free(model);
    return cost;
}

static int bench_pipeline(int argc, char **argv)
{
    fm_config cfg;
    char dir[] = "/tmp/fleetml-bench-pipeline-XXXXXX";
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    /* Start from the defaults of a fresh data directory, then apply the
     * command line (e.g. --set pipeline.workers=0). */
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    snprintf(cfg.data_dir, sizeof cfg.data_dir, "%s", dir);
    const char *n_s = fm_cli_take_opt(&argc, argv, "--n");
    uint64_t n = 20000;
    if (n_s && (fm_cli_parse_u64(n_s, 10000000, &n) != 0 || n == 0)) {
        fprintf(stderr, "fleetml bench pipeline: --n expects 1..10000000\n");
        return 2;
    }
    if (access(cfg.model_dir, R_OK) != 0) {
#ifdef FM_DEFAULT_MODEL_DIR
        snprintf(cfg.model_dir, sizeof cfg.model_dir, "%s", FM_DEFAULT_MODEL_DIR);
#endif
    }
    fm_errbuf err;
    fm_store *st;
    fm_device d = {.id = "bench-device", .tenant = "bench", .status = FM_DEVICE_ACTIVE};
    if (fm_store_open(&cfg, &st, &err) != 0 || fm_store_tenant_ensure(st, "bench", &err) != 0 ||
        fm_store_device_add(st, &d, &err) != 0) {
        fprintf(stderr, "fleetml bench pipeline: %s\n", err.msg);
        return 1;
    }
    fm_store_close(st);

    /* A pool of real simulator sweeps; only the id differs per message. */
    enum { POOL = 64 };
    char *pool[POOL];
    size_t pool_len[POOL], id_off[POOL];
    fm_rng rng;
    fm_rng_seed(&rng, 42);
    const char *tmpl = "b-000000000000";
    for (int i = 0; i < POOL; i++) {
        fm_visc_truth t;
        fm_visc_draw_truth(&rng, &t);
        if (fm_visc_measurement_json(&rng, &t, tmpl, "bench", fm_wall_ms(), &pool[i],
                                     &pool_len[i]) != 0)
            return 1;
        id_off[i] = (size_t)((char *)memmem(pool[i], pool_len[i], tmpl, strlen(tmpl)) - pool[i]);
    }

    /* Parse + validate, and feature extraction, alone on this thread. */
    double parse_us, features_us;
    stage_costs(pool, pool_len, POOL, n, &parse_us, &features_us);
    double predict_one_us = predict_one_cost(cfg.model_dir, pool, pool_len, POOL);

    counter c = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
    fm_pipeline *p;
    fm_pipeline_opts o = {.cfg = &cfg, .publish = count_reply, .ud = &c};
    if (fm_pipeline_start(&o, &p, &err) != 0) {
        fprintf(stderr, "fleetml bench pipeline: %s\n", err.msg);
        return 1;
    }
    double cpu0 = cpu_s();
    uint64_t t0 = fm_mono_ns();
    for (uint64_t i = 0; i < n; i++) {
        int k = (int)(i % POOL);
        char id[32];
        snprintf(id, sizeof id, "b-%012llu", (unsigned long long)i);
        memcpy(pool[k] + id_off[k], id, strlen(tmpl));
        fm_inmsg *m = fm_inmsg_new("bench-device", pool[k], pool_len[k], NULL, NULL, 0);
        /* Keep the queue bounded like a real broker connection would. */
        while (m && fm_pipeline_submit(p, m) == FM_EBUSY) {
            struct timespec ts = {0, 200000};
            nanosleep(&ts, NULL);
        }
    }
    pthread_mutex_lock(&c.mu);
    while (c.replies < n)
        pthread_cond_wait(&c.cv, &c.mu);
    pthread_mutex_unlock(&c.mu);
    double secs = (double)(fm_mono_ns() - t0) / 1e9;
    double cpu = cpu_s() - cpu0;
    fm_pipeline_stop(p);
    fm_metrics *mx = fm_metrics_get();
    double infer = (double)atomic_load(&mx->inference_seconds.sum_micro) / 1e6;
    double commit = (double)atomic_load(&mx->commit_seconds.sum_micro) / 1e6;
    uint64_t batches = atomic_load(&mx->commit_batch_size.count);
    printf("{\"bench\":\"pipeline\",\"measurements\":%llu,\"ok\":%llu,\"seconds\":%.3f,"
           "\"per_s\":%.1f,\"cpu_us_per_measurement\":%.1f,\"workers\":%d,"
           "\"inference_us_per_measurement\":%.1f,\"commit_us_per_measurement\":%.1f,"
           "\"mean_batch\":%.1f,\"payload_bytes\":%zu,\"parse_validate_us\":%.2f,"
           "\"features_us\":%.2f,\"predict_one_row_us\":%.1f}\n",
           (unsigned long long)n, (unsigned long long)c.ok, secs, (double)n / secs,
           cpu * 1e6 / (double)n, cfg.pipeline_workers, infer * 1e6 / (double)n,
           commit * 1e6 / (double)n, batches ? (double)n / (double)batches : 0.0, pool_len[0],
           parse_us, features_us, predict_one_us);
    for (int i = 0; i < POOL; i++)
        fm_free(pool[i]);
    nftw(dir, rm_cb, 8, FTW_DEPTH | FTW_PHYS);
    return c.ok == n ? 0 : 1;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* `fleetml bench function DIR`: the function deployed in DIR (its
 * function.json, as `serve` reads it) started cold `--starts` times (spawn
 * to ready line, sandbox included), then called warm N times in a row
 * with a result.produced event: what a warm function adds to a delivery.
 * One JSON line, times in microseconds. */
static int bench_function(int argc, char **argv)
{
    const char *n_opt = fm_cli_take_opt(&argc, argv, "--n");
    const char *starts_opt = fm_cli_take_opt(&argc, argv, "--starts");
    const char *event_file = fm_cli_take_opt(&argc, argv, "--event");
    const char *pause_opt = fm_cli_take_opt(&argc, argv, "--pause-us");
    if (argc != 2) {
        return fm_cli_usage_error("bench function", "name one function directory");
    }
    long n = n_opt ? strtol(n_opt, NULL, 10) : 5000;
    long starts = starts_opt ? strtol(starts_opt, NULL, 10) : 10;
    if (n < 10 || n > 10000000 || starts < 1 || starts > 1000) {
        return fm_cli_usage_error("bench function", "--n 10.. and --starts 1..1000");
    }
    char dir[PATH_MAX], path[PATH_MAX + 16], command[PATH_MAX];
    if (!realpath(argv[1], dir)) {
        fprintf(stderr, "fleetml bench function: %s: no such directory\n", argv[1]);
        return 1;
    }
    snprintf(path, sizeof path, "%s/function.json", dir);
    json_error_t jerr;
    json_t *doc = json_load_file(path, 0, &jerr);
    const char *base = strrchr(dir, '/');
    char *env[FM_FN_ENV_MAX] = {0};
    fm_fn_spec spec;
    fm_errbuf err = {0};
    int rc = doc ? fm_fn_spec_from_json(dir, base ? base + 1 : dir, doc, &spec, command,
                                        sizeof command, env, FM_FN_ENV_MAX, &err)
                 : fm_errf(&err, FM_EINVAL, "%s: %s", path, jerr.text);
    int64_t *cold = fm_calloc((size_t)starts, sizeof *cold), *warm = fm_calloc((size_t)n, sizeof *warm);
    char *event_text = NULL;
    size_t event_len = 0;
    if (event_file && fm_read_file(event_file, &event_text, &event_len) != 0) {
        fprintf(stderr, "fleetml bench function: cannot read %s\n", event_file);
        return 1;
    }
    long pause_us = pause_opt ? strtol(pause_opt, NULL, 10) : 0;
    const char *event = event_text ? event_text : 
        "{\"specversion\":\"fleetml.events/1\",\"id\":\"result.produced:1\",\"type\":"
        "\"result.produced\",\"time\":\"2026-12-04T09:30:58.456Z\",\"tenant\":\"bench\","
        "\"subject\":\"devices/icu-1/measurements/m-1\",\"data\":{\"device\":\"icu-1\","
        "\"measurement_id\":\"m-1\",\"model\":\"viscosity@1.0.0\",\"status\":\"ok\","
        "\"outputs\":{\"viscosity_high_mpas\":3.88,\"viscosity_low_mpas\":15.86,"
        "\"hematocrit_pct\":61.5}}}";
    fm_fn_pool *p = NULL;
    spec.min_workers = 1;
    spec.max_workers = spec.max_workers < 1 ? 1 : spec.max_workers;
    if (!cold || !warm)
        rc = rc ? rc : fm_errf(&err, FM_ENOMEM, "out of memory");
    for (long i = 0; !rc && i < starts; i++) {
        int64_t t0 = fm_mono_ns();
        rc = fm_fn_pool_start(&spec, &p, &err);
        cold[i] = (fm_mono_ns() - t0) / 1000;
        if (!rc && i + 1 < starts) {
            fm_fn_pool_stop(p);
            p = NULL;
        }
    }
    for (long i = 0; !rc && i < n; i++) {
        char *result = NULL;
        int64_t t0 = fm_mono_ns();
        rc = fm_fn_call(p, event, &result, NULL, &err);
        warm[i] = (fm_mono_ns() - t0) / 1000;
        fm_free(result);
        if (pause_us > 0) {
            struct timespec ts = {pause_us / 1000000, (pause_us % 1000000) * 1000};
            nanosleep(&ts, NULL);
        }
    }
    fm_fn_pool_stop(p);
    if (!rc) {
        qsort(cold, (size_t)starts, sizeof *cold, cmp_i64);
        qsort(warm, (size_t)n, sizeof *warm, cmp_i64);
        printf("{\"function\":\"%s\",\"calls\":%ld,\"warm_us\":{\"p50\":%lld,\"p99\":%lld,"
               "\"max\":%lld},\"starts\":%ld,\"cold_start_us\":{\"p50\":%lld,\"max\":%lld}}\n",
               spec.name, n, (long long)warm[n / 2], (long long)warm[n * 99 / 100],
               (long long)warm[n - 1], starts, (long long)cold[starts / 2],
               (long long)cold[starts - 1]);
    } else {
        fprintf(stderr, "fleetml bench function: %s\n", err.msg);
    }
    for (size_t i = 0; i < FM_FN_ENV_MAX; i++)
        fm_free(env[i]);
    fm_free(cold);
    fm_free(warm);
    fm_free(event_text);
    json_decref(doc);
    return rc ? 1 : 0;
}

int fm_cmd_bench(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "pipeline") == 0)
        return bench_pipeline(argc - 1, argv + 1);
    if (argc >= 2 && strcmp(argv[1], "function") == 0)
        return bench_function(argc - 1, argv + 1);
    return fm_cli_usage_error("bench", "name a benchmark: pipeline or function");
}

const fm_cli_cmd fm_cli_bench_cmds[] = {
    {.name = "bench",
     .summary = "in-process benchmarks, one JSON line each",
     .text = "The end-to-end benchmark against a broker is `make bench` (bench/run.py)."},
    {.name = "bench pipeline",
     .summary = "the measurement pipeline in-process: CPU per measurement",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--n", "N", "measurements to run (default 20000)"}},
     .examples = {"fleetml bench pipeline --n 50000 --set pipeline.workers=2"}},
    {.name = "bench function",
     .summary = "a function's warm call latency and cold start",
     .args = "DIR",
     .opts = {{"--n", "N", "warm calls (10..)"},
              {"--starts", "K", "cold starts to time (1..1000)"},
              {"--event", "FILE", "the event to send (default: a result.produced event)"},
              {"--pause-us", "U", "pause between calls, microseconds"}},
     .examples = {"fleetml bench function examples/functions/python-ward-note --n 2000"}},
    {.name = NULL},
};
