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
 * over n parses of the pool (the pipeline's first stage, without queues).
 * Each stage is timed as a whole loop: reading the thread's CPU clock is a
 * system call here, and one pair per call would add its own cost to every
 * figure. The parse loop includes freeing each measurement; features are
 * extracted from the pool parsed once. */
static void stage_costs(char *const *pool, const size_t *pool_len, int npool, uint64_t n,
                        double *parse_us, double *features_us)
{
    uint64_t parsed = 0;
    double t0 = thread_cpu_s();
    for (uint64_t i = 0; i < n; i++) {
        fm_measurement m;
        fm_verr e;
        if (fm_measurement_parse(pool[i % (uint64_t)npool], pool_len[i % (uint64_t)npool], &m,
                                 &e) == 0) {
            parsed++;
            fm_measurement_free(&m);
        }
    }
    double t1 = thread_cpu_s();
    fm_measurement *ms = fm_calloc((size_t)npool, sizeof *ms);
    int ok = ms != NULL && parsed == n, nms = 0; /* ms[0 .. nms-1] parsed */
    while (ok && nms < npool) {
        fm_verr e;
        ok = fm_measurement_parse(pool[nms], pool_len[nms], &ms[nms], &e) == 0;
        nms += ok; /* a failed parse leaves nothing to free */
    }
    double t2 = thread_cpu_s();
    for (uint64_t i = 0; ok && i < n; i++) {
        float f[FM_FEATURES_MAX];
        fm_verr e;
        ok = fm_features_extract(&ms[i % (uint64_t)npool], f, &e) == 0;
    }
    double t3 = thread_cpu_s();
    for (int i = 0; i < nms; i++)
        fm_measurement_free(&ms[i]);
    fm_free(ms);
    /* A pool that does not parse or extract is a broken simulator: say so
     * with an impossible figure rather than a fast one. */
    *parse_us = parsed == n ? (t1 - t0) * 1e6 / (double)n : -1;
    *features_us = ok ? (t3 - t2) * 1e6 / (double)n : -1;
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

/* What one pass of the pipeline bench submits: the pool of sweeps, each
 * with its id at id_off (id_len characters, rewritten per message). */
typedef struct pass_in {
    fm_pipeline *p;
    counter *c;
    char **pool;
    const size_t *pool_len, *id_off;
    int npool;
    size_t id_len;
} pass_in;

/* Submits measurements first .. first+n-1 and waits for all their replies.
 * The queue pushes back (FM_EBUSY) like a real broker connection would. */
static void run_pass(const pass_in *in, uint64_t first, uint64_t n)
{
    for (uint64_t i = first; i < first + n; i++) {
        int k = (int)(i % (uint64_t)in->npool);
        char id[32];
        snprintf(id, sizeof id, "b-%012llu", (unsigned long long)i);
        memcpy(in->pool[k] + in->id_off[k], id, in->id_len);
        fm_inmsg *m = fm_inmsg_new("bench-device", in->pool[k], in->pool_len[k], NULL, NULL, 0);
        while (m && fm_pipeline_submit(in->p, m) == FM_EBUSY) {
            struct timespec ts = {0, 200000};
            nanosleep(&ts, NULL);
        }
    }
    pthread_mutex_lock(&in->c->mu);
    while (in->c->replies < first + n)
        pthread_cond_wait(&in->c->cv, &in->c->mu);
    pthread_mutex_unlock(&in->c->mu);
}

static int cmp_i64(const void *a, const void *b);

/* Submits k measurements one at a time, each after the previous one's
 * reply and a pause of gap_ms (long enough for this machine's caches to
 * go cold, as between two measurements of a quiet fleet), and stores each
 * one's submit-to-reply time in us[]: what a lone measurement costs inside
 * the service, broker and network left out. */
static void run_lone(const pass_in *in, uint64_t first, int k, int gap_ms, int64_t *us)
{
    for (int j = 0; j < k; j++) {
        struct timespec gap = {gap_ms / 1000, (long)(gap_ms % 1000) * 1000000L};
        nanosleep(&gap, NULL);
        uint64_t t0 = fm_mono_ns();
        run_pass(in, first + (uint64_t)j, 1);
        us[j] = (int64_t)((fm_mono_ns() - t0) / 1000);
    }
    qsort(us, (size_t)k, sizeof *us, cmp_i64);
}

static int bench_pipeline(int argc, char **argv)
{
    fm_config cfg;
    /* $TMPDIR picks the file system (a tmpfs there leaves the disk out). */
    const char *tmp = getenv("TMPDIR");
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s/fleetml-bench-pipeline-XXXXXX", tmp && *tmp ? tmp : "/tmp");
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
    const char *warm_s = fm_cli_take_opt(&argc, argv, "--warmup");
    const char *lone_s = fm_cli_take_opt(&argc, argv, "--lone");
    uint64_t n = 20000, warmup, lone = 0;
    if (n_s && (fm_cli_parse_u64(n_s, 10000000, &n) != 0 || n == 0)) {
        fprintf(stderr, "fleetml bench pipeline: --n expects 1..10000000\n");
        return 2;
    }
    warmup = n;
    if (warm_s && fm_cli_parse_u64(warm_s, 10000000, &warmup) != 0) {
        fprintf(stderr, "fleetml bench pipeline: --warmup expects 0..10000000\n");
        return 2;
    }
    if (lone_s && fm_cli_parse_u64(lone_s, 100000, &lone) != 0) {
        fprintf(stderr, "fleetml bench pipeline: --lone expects 0..100000\n");
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
    /* The warm-up pass is not measured: it grows the allocator's arenas to
     * the run's depth (the whole pass is in flight at once), creates the
     * WAL and fills the caches, all once per process in a service. */
    pass_in pin = {p, &c, pool, pool_len, id_off, POOL, strlen(tmpl)};
    run_pass(&pin, 0, warmup);
    pthread_mutex_lock(&c.mu);
    uint64_t ok0 = c.ok;
    pthread_mutex_unlock(&c.mu);
    fm_metrics *mx = fm_metrics_get();
    double infer0 = (double)atomic_load(&mx->inference_seconds.sum_micro) / 1e6;
    double commit0 = (double)atomic_load(&mx->commit_seconds.sum_micro) / 1e6;
    uint64_t batches0 = atomic_load(&mx->commit_batch_size.count);
    double cpu0 = cpu_s();
    uint64_t t0 = fm_mono_ns();
    run_pass(&pin, warmup, n);
    double secs = (double)(fm_mono_ns() - t0) / 1e9;
    double cpu = cpu_s() - cpu0;
    double infer = (double)atomic_load(&mx->inference_seconds.sum_micro) / 1e6 - infer0;
    double commit = (double)atomic_load(&mx->commit_seconds.sum_micro) / 1e6 - commit0;
    uint64_t batches = atomic_load(&mx->commit_batch_size.count) - batches0;
    uint64_t ok = c.ok - ok0; /* the measured pass's */
    /* Lone measurements, 20 ms apart. */
    enum { LONE_GAP_MS = 20 };
    int64_t *lone_us = lone ? fm_calloc(lone, sizeof *lone_us) : NULL;
    if (lone_us)
        run_lone(&pin, warmup + n, (int)lone, LONE_GAP_MS, lone_us);
    fm_pipeline_stop(p);
    printf("{\"bench\":\"pipeline\",\"measurements\":%llu,\"warmup\":%llu,\"ok\":%llu,"
           "\"seconds\":%.3f,\"per_s\":%.1f,\"cpu_us_per_measurement\":%.1f,\"workers\":%d,"
           "\"inference_us_per_measurement\":%.1f,\"commit_us_per_measurement\":%.1f,"
           "\"mean_batch\":%.1f,\"payload_bytes\":%zu,\"parse_validate_us\":%.2f,"
           "\"features_us\":%.2f,\"predict_one_row_us\":%.1f",
           (unsigned long long)n, (unsigned long long)warmup, (unsigned long long)ok, secs,
           (double)n / secs, cpu * 1e6 / (double)n, cfg.pipeline_workers,
           infer * 1e6 / (double)n, commit * 1e6 / (double)n,
           batches ? (double)n / (double)batches : 0.0, pool_len[0], parse_us, features_us,
           predict_one_us);
    if (lone_us)
        printf(",\"lone\":{\"n\":%llu,\"gap_ms\":%d,\"reply_us\":{\"p50\":%lld,\"p90\":%lld,"
               "\"max\":%lld}}",
               (unsigned long long)lone, LONE_GAP_MS, (long long)lone_us[lone / 2],
               (long long)lone_us[lone * 9 / 10], (long long)lone_us[lone - 1]);
    printf("}\n");
    fm_free(lone_us);
    int all_ok = c.ok == c.replies && c.replies == warmup + n + (lone_us ? lone : 0);
    for (int i = 0; i < POOL; i++)
        fm_free(pool[i]);
    nftw(dir, rm_cb, 8, FTW_DEPTH | FTW_PHYS);
    return all_ok ? 0 : 1;
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
     .opts = {{"--n", "N", "measurements to measure (default 20000)"},
              {"--warmup", "W", "measurements run first, not measured (default N)"},
              {"--lone", "K", "then K measurements one at a time, 20 ms apart: submit-to-reply times"}},
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
