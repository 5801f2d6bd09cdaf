/* `fleetml lake flush|check`: export everything committed now; a round
 * trip through the configured lake backend. */
#include "cli/cli.h"
#include "fleetml/lake.h"
#include "fleetml/metrics.h"
#include "fleetml/store.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int check(const fm_config *cfg, int argc, char **argv)
{
    size_t bytes = 1024;
    for (int i = 2; i < argc; i++) {
        char *end;
        if (strcmp(argv[i], "--bytes") == 0 && i + 1 < argc) {
            unsigned long long v = strtoull(argv[++i], &end, 10);
            if (*end || v == 0 || v > (1ull << 32))
                return fm_cli_usage_error("lake check", "--bytes expects 1..4294967296");
            bytes = (size_t)v;
        } else {
            return fm_cli_usage_error("lake check", "unexpected argument '%s'", argv[i]);
        }
    }
    fm_lake_check_report r;
    fm_errbuf err;
    if (fm_lake_check(cfg, bytes, &r, &err) != 0) {
        fprintf(stderr, "fleetml lake check: %s\n", err.msg);
        return 1;
    }
    printf("lake %s ok: %s, %zu bytes put in %lld ms, listed, read back identical in %lld ms, "
           "deleted\n",
           r.backend, r.key, r.bytes, (long long)r.put_ms, (long long)r.get_ms);
    return 0;
}

/* Rows committed and not yet in the lake, over every stream (0 when the
 * store cannot say: the flush then runs without a progress line). */
static uint64_t backlog(const fm_config *cfg)
{
    fm_store *st;
    fm_errbuf err;
    if (fm_store_open(cfg, &st, &err) != 0)
        return 0;
    uint64_t rows = 0;
    for (int s = 0; s < FM_STREAM_COUNT; s++) {
        int64_t max = 0;
        fm_lake_cursor c;
        if (fm_store_max_seq(st, (enum fm_lake_stream)s, &max) == 0 &&
            fm_store_lake_cursor_get(st, FM_LAKE_CURSOR_OWNER, (enum fm_lake_stream)s, &c) == 0 &&
            max > c.last_seq)
            rows += (uint64_t)(max - c.last_seq);
    }
    fm_store_close(st);
    return rows;
}

typedef struct flush_job {
    const fm_config *cfg;
    fm_errbuf err;
    int rc;
    _Atomic bool done;
} flush_job;

static void *flush_main(void *arg)
{
    flush_job *j = arg;
    j->rc = fm_lake_export_all(j->cfg, &j->err);
    atomic_store(&j->done, true);
    return NULL;
}

/* Exports on a thread while this one shows the rows done (on a terminal). */
static int flush(const fm_config *cfg)
{
    uint64_t total = backlog(cfg), before = atomic_load(&fm_metrics_get()->lake_rows);
    flush_job j = {.cfg = cfg};
    pthread_t t;
    if (pthread_create(&t, NULL, flush_main, &j) != 0) {
        fprintf(stderr, "fleetml lake flush: cannot start a thread\n");
        return 1;
    }
    while (!atomic_load(&j.done)) {
        uint64_t rows = atomic_load(&fm_metrics_get()->lake_rows) - before;
        if (total > 0)
            fm_cli_progress("rows exported", (int)(rows * 99 / total));
        struct timespec ts = {0, 200 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    pthread_join(t, NULL);
    uint64_t rows = atomic_load(&fm_metrics_get()->lake_rows) - before;
    if (total > 0)
        fm_cli_progress("rows exported", 100);
    if (j.rc != 0) {
        fprintf(stderr, "fleetml lake flush: %s\n", j.err.msg);
        return 1;
    }
    printf("lake up to date (%s): %llu rows exported\n", cfg->lake_backend,
           (unsigned long long)rows);
    return 0;
}

int fm_cmd_lake(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    if (argc >= 2 && strcmp(argv[1], "check") == 0)
        return check(&cfg, argc, argv);
    if (argc != 2 || strcmp(argv[1], "flush") != 0)
        return fm_cli_usage_error("lake", "name flush or check");
    return flush(&cfg);
}

const fm_cli_cmd fm_cli_lake_cmds[] = {
    {.name = "lake", .summary = "the data lake: export now, check the store behind it"},
    {.name = "lake flush",
     .summary = "export everything committed to the lake now",
     .text = "For when `fleetml serve` is stopped; serve exports by itself.",
     .flags = FM_CLI_CONFIG,
     .examples = {"fleetml lake flush --data /var/lib/fleetml"}},
    {.name = "lake check",
     .summary = "a round trip to the lake: put, list, read back, delete",
     .text = "Puts an object of N random bytes (on S3, above lake.s3_part_bytes it goes\n"
             "up in parts), lists it, reads it back and deletes it.",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--bytes", "N", "the object's size (default 1024)"}},
     .examples = {"fleetml lake check --bytes 20000000"}},
    {.name = NULL},
};
