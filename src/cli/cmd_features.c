/*
 * `fleetml features`: NDJSON measurements on stdin -> feature CSV on stdout.
 * It runs the production validator and extractor, so the CSV is exactly
 * what the served model sees; useful for offline analysis and for
 * retraining from lake exports.
 */
#include "cli/cli.h"
#include "fleetml/measurement.h"
#include "fleetml/model.h"

#include <stdio.h>
#include <string.h>

/* Reads one line (without the newline) into *buf, growing it with
 * fm_realloc. A line longer than cap is consumed to its end but only the
 * first cap + 1 bytes are kept, so the validator still reports it as too
 * large without the command buffering an arbitrarily long line. Returns 1
 * for a line, 0 at end of input, FM_ENOMEM on allocation failure. */
static int read_line(FILE *f, char **buf, size_t *bufcap, size_t cap, size_t *len)
{
    size_t n = 0;
    int c, any = 0;
    while ((c = getc(f)) != EOF) {
        any = 1;
        if (c == '\n')
            break;
        if (n > cap)
            continue;
        if (n + 1 >= *bufcap) {
            size_t nc = *bufcap ? *bufcap * 2 : 4096;
            char *nb = fm_realloc(*buf, nc);
            if (!nb)
                return FM_ENOMEM;
            *buf = nb;
            *bufcap = nc;
        }
        (*buf)[n++] = (char)c;
    }
    if (!any)
        return 0;
    if (n > 0 && (*buf)[n - 1] == '\r')
        n--;
    *len = n;
    return 1;
}

static int blank(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t')
            return 0;
    return 1;
}

/* Writes a CSV field, quoting it (RFC 4180) only when it needs it. */
static void csv_field(FILE *f, const char *s)
{
    if (!strpbrk(s, ",\"\r\n")) {
        fputs(s, f);
        return;
    }
    putc('"', f);
    for (; *s; s++) {
        if (*s == '"')
            putc('"', f);
        putc(*s, f);
    }
    putc('"', f);
}

int fm_cmd_features(int argc, char **argv)
{
    if (argc > 1) {
        int help = strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0;
        fprintf(help ? stdout : stderr,
                "usage: fleetml features < measurements.ndjson > features.csv\n"
                "reads one viscosity.sweep.v1 measurement per line and writes\n"
                "id,<features> CSV; invalid lines are reported on stderr\n");
        return help ? 0 : 2;
    }
    size_t nf = fm_feature_count();
    float feats[FM_FEATURES_MAX];
    char *buf = NULL;
    size_t bufcap = 0, len = 0, lineno = 0, failed = 0;
    int rc;

    fputs("id", stdout);
    for (size_t i = 0; i < nf; i++)
        printf(",%s", fm_feature_name(i));
    putchar('\n');

    while ((rc = read_line(stdin, &buf, &bufcap, FM_MEAS_MAX_BYTES, &len)) == 1) {
        lineno++;
        if (len == 0 || blank(buf, len))
            continue;
        fm_measurement m;
        fm_verr ve;
        int prc = fm_measurement_parse(buf, len, &m, &ve);
        if (prc == 0) {
            prc = fm_features_extract(&m, feats, &ve);
            if (prc == 0) {
                csv_field(stdout, m.id);
                for (size_t i = 0; i < nf; i++)
                    printf(",%.9g", (double)feats[i]);
                putchar('\n');
            }
            fm_measurement_free(&m);
        }
        if (prc != 0) {
            fprintf(stderr, "fleetml features: line %zu: %s: %s\n", lineno, ve.code, ve.message);
            failed++;
        }
    }
    fm_free(buf);
    if (rc == FM_ENOMEM) {
        fprintf(stderr, "fleetml features: out of memory at line %zu\n", lineno + 1);
        return 1;
    }
    if (ferror(stdin)) {
        fprintf(stderr, "fleetml features: error reading stdin\n");
        return 1;
    }
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "fleetml features: error writing stdout\n");
        return 1;
    }
    if (failed)
        fprintf(stderr, "fleetml features: %zu of %zu lines failed\n", failed, lineno);
    return failed ? 1 : 0;
}

const fm_cli_cmd fm_cli_features_cmds[] = {
    {.name = "features",
     .summary = "measurements (NDJSON on stdin) to feature CSV on stdout",
     .text = "Reads one viscosity.sweep.v1 measurement per line and writes id,<features>\n"
             "CSV, the features the model sees; invalid lines are reported on stderr.",
     .examples = {"fleetml features < measurements.ndjson > features.csv"}},
    {.name = NULL},
};
