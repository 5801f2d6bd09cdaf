#include "cli/cli.h"

#include <stdio.h>
#include <string.h>

static void drop(int *argc, char **argv, int i, int n)
{
    for (int j = i; j + n <= *argc; j++)
        argv[j] = argv[j + n];
    *argc -= n;
}

const char *fm_cli_take_opt(int *argc, char **argv, const char *name)
{
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
