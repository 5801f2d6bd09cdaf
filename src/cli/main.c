#include "cli/cli.h"

#include <stdio.h>
#include <string.h>

static const struct {
    const char *name;
    int (*fn)(int, char **);
    const char *help;
} commands[] = {
    {"init", fm_cmd_init, "create the data directory: CA, certificates, database, lake, admin"},
    {"serve", fm_cmd_serve, "run the platform on this node (broker, pipeline, lake, HTTP)"},
    {"device", fm_cmd_device, "add | disable | enable | revoke | shadow | run (simulated)"},
    {"template", fm_cmd_template, "provisioning templates: add | list | disable | enable | claim-cert"},
    {"user", fm_cmd_user, "users: add | list | disable | enable | passwd | roles"},
    {"sim", fm_cmd_sim, "run many simulated devices: --devices N --rate R"},
    {"features", fm_cmd_features, "measurements (NDJSON on stdin) -> feature CSV on stdout"},
    {"model", fm_cmd_model, "train --synthetic | info"},
    {"bench", fm_cmd_bench, "pipeline: the measurement pipeline in-process, one JSON line"},
    {"lake", fm_cmd_lake, "flush: export everything committed now; check: a round trip to the lake"},
    {"rules", fm_cmd_rules, "rules on events: list | put FILE | delete NAME | log NAME"},
    {"function", fm_cmd_function, "this node's functions: list | call NAME (event on stdin)"},
    {"api", fm_cmd_api, "routes: list the HTTP API's routes and the permission each needs"},
};

static void usage(FILE *f)
{
    fprintf(f, "usage: fleetml <command> [options]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-9s %s\n", commands[i].name, commands[i].help);
    fprintf(f, "\ncommon options: --data DIR (default ./var), --set section.key=value\n");
}

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("fleetml %s\n", FM_VERSION);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(argv[1], commands[i].name) == 0)
            return commands[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "fleetml: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
