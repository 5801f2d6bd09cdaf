#include "cli/cli.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void drop(int *argc, char **argv, int i, int n)
{
    for (int j = i; j + n <= *argc; j++)
        argv[j] = argv[j + n];
    *argc -= n;
}

/* The tables of the command running now (help.c sets it): with
 * FLEETML_CLI_STRICT set, asking for an option none of them lists is a
 * bug, and aborts. */
const fm_cli_cmd *fm_cli__running;
const fm_cli_cmd *fm_cli__running_group;

static void strict_check(const char *name)
{
    /* --data, --set and help are every command's (help is answered before
     * a command runs; some parsers still look for it). */
    if (!fm_cli__running_group || !getenv("FLEETML_CLI_STRICT") || strcmp(name, "--data") == 0 ||
        strcmp(name, "--set") == 0 || strcmp(name, "--help") == 0 || strcmp(name, "-h") == 0)
        return;
    for (const fm_cli_cmd *c = fm_cli__running_group; c->name; c++)
        for (size_t i = 0; i < FM_CLI_OPTS_MAX && c->opts[i].name; i++)
            if (strcmp(c->opts[i].name, name) == 0)
                return;
    fprintf(stderr, "fleetml: internal error: '%s' parses option %s, which its table does not "
                    "list\n",
            fm_cli__running ? fm_cli__running->name : "?", name);
    abort();
}

const char *fm_cli_take_opt(int *argc, char **argv, const char *name)
{
    strict_check(name);
    for (int i = 1; i < *argc; i++) {
        if (strcmp(argv[i], name) == 0 && i + 1 < *argc) {
            const char *v = argv[i + 1];
            drop(argc, argv, i, 2);
            return v;
        }
    }
    return NULL;
}

int fm_cli_take_flag(int *argc, char **argv, const char *name)
{
    strict_check(name);
    for (int i = 1; i < *argc; i++) {
        if (strcmp(argv[i], name) == 0) {
            drop(argc, argv, i, 1);
            return 1;
        }
    }
    return 0;
}

int fm_cli_config(int *argc, char **argv, fm_config *cfg)
{
    const char *data = fm_cli_take_opt(argc, argv, "--data");
    fm_errbuf err;
    if (fm_config_defaults(cfg, data) != 0) {
        fprintf(stderr, "fleetml: data directory path too long\n");
        return 2;
    }
    char path[PATH_MAX];
    if (fm_config_load(cfg, fm_config_path(cfg, "fleetml.conf", path, sizeof path), &err) != 0) {
        fprintf(stderr, "fleetml: %s: %s\n", path, err.msg);
        return 2;
    }
    const char *kv;
    while ((kv = fm_cli_take_opt(argc, argv, "--set")) != NULL) {
        const char *eq = strchr(kv, '=');
        if (!eq) {
            fprintf(stderr, "fleetml: --set expects section.key=value, got '%s'\n", kv);
            return 2;
        }
        char key[128];
        snprintf(key, sizeof key, "%.*s", (int)(eq - kv), kv);
        if (fm_config_set(cfg, key, eq + 1, &err) != 0) {
            fprintf(stderr, "fleetml: --set %s: %s\n", kv, err.msg);
            return 2;
        }
    }
    fm_log_set_level((enum fm_log_level)cfg->log_level);
    return 0;
}

void fm_cli_base36(uint64_t v, char *buf, size_t len)
{
    char tmp[16];
    size_t n = 0;
    do {
        tmp[n++] = "0123456789abcdefghijklmnopqrstuvwxyz"[v % 36];
        v /= 36;
    } while (v && n < sizeof tmp);
    size_t i = 0;
    for (; i < n && i + 1 < len; i++)
        buf[i] = tmp[n - 1 - i];
    buf[i] = '\0';
}

int fm_cli_parse_double(const char *s, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v))
        return FM_EINVAL;
    *out = v;
    return 0;
}

int fm_cli_parse_u64(const char *s, uint64_t max, uint64_t *out)
{
    /* strtoull alone would accept "-1" (wrapping it) and leading blanks. */
    if (*s < '0' || *s > '9')
        return FM_EINVAL;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || v > max)
        return FM_EINVAL;
    *out = v;
    return 0;
}

int fm_cli_print_json(json_t *doc)
{
    char *text = doc ? json_dumps(doc, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;
    json_decref(doc);
    if (!text)
        return 1;
    printf("%s\n", text);
    free(text);
    return 0;
}

void fm_cli_progress(const char *what, int pct)
{
    static int tty = -1;
    if (tty < 0)
        tty = isatty(STDERR_FILENO);
    if (!tty)
        return;
    pct = pct < 0 ? 0 : pct > 100 ? 100 : pct;
    int bar = pct / 5;
    fprintf(stderr, "\r[%.*s%*s] %3d%% %-32.32s", bar, "####################", 20 - bar, "", pct,
            what);
    if (pct == 100)
        fputc('\n', stderr);
    fflush(stderr);
}
