/* `fleetml lake flush|check`: export everything committed now; a round
 * trip through the configured lake backend. */
#include "cli/cli.h"
#include "fleetml/lake.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int usage(void)
{
    fprintf(stderr,
            "usage: fleetml lake flush [--data DIR]\n"
            "         export everything committed to the lake now (while `fleetml serve` is\n"
            "         stopped; serve exports by itself)\n"
            "       fleetml lake check [--bytes N] [--data DIR]\n"
            "         put an object of N random bytes (default 1024; on S3, above\n"
            "         lake.s3_part_bytes it goes up in parts), list it, read it back, delete it\n");
    return 2;
}

static int check(const fm_config *cfg, int argc, char **argv)
{
    size_t bytes = 1024;
    for (int i = 2; i < argc; i++) {
        char *end;
        if (strcmp(argv[i], "--bytes") == 0 && i + 1 < argc) {
            unsigned long long v = strtoull(argv[++i], &end, 10);
            if (*end || v == 0 || v > (1ull << 32))
                return usage();
            bytes = (size_t)v;
        } else {
            return usage();
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

int fm_cmd_lake(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    if (argc >= 2 && strcmp(argv[1], "check") == 0)
        return check(&cfg, argc, argv);
    if (argc != 2 || strcmp(argv[1], "flush") != 0)
        return usage();
    fm_errbuf err;
    if (fm_lake_export_all(&cfg, &err) != 0) {
        fprintf(stderr, "fleetml lake flush: %s\n", err.msg);
        return 1;
    }
    printf("lake up to date (%s)\n", cfg.lake_backend);
    return 0;
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
