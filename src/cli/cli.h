/*
 * `fleetml` subcommands. Each returns a process exit status (0 ok, 1 runtime
 * failure, 2 usage error) and prints human-facing output on stdout, errors
 * on stderr.
 */
#ifndef FLEETML_CLI_H
#define FLEETML_CLI_H

#include "fleetml/config.h"

#include <stdint.h>

/* ---- the command tables -----------------------------------------------------------
 *
 * Every command and subcommand is described once, in a table next to the
 * code that parses it (each cmd_*.c exports its own). The same table gives
 * `fleetml help`, `--help`, the man page, bash completion, and the check
 * main() makes before a command runs: an option not in the table is refused
 * with its name and a pointer to the help (exit 2). With FLEETML_CLI_STRICT
 * set (the tests set it), fm_cli_take_opt/flag abort on an option that is
 * not in the running command's tables, so a parser cannot grow an option
 * the help does not show. */

/* One option: "--tenant" with its value's name ("T"), or a flag (arg NULL). */
typedef struct fm_cli_opt {
    const char *name;
    const char *arg;
    const char *help; /* one line */
} fm_cli_opt;

#define FM_CLI_OPTS_MAX 20
/* Takes --data DIR and --set section.key=value (fm_cli_config). */
#define FM_CLI_CONFIG 1u
/* Not listed in help, the man page or completion (internal helpers). */
#define FM_CLI_HIDDEN 2u

/* A command ("serve"), a group ("device") or a subcommand ("device add"). */
typedef struct fm_cli_cmd {
    const char *name;    /* words separated by one space; NULL ends a table */
    const char *args;    /* positional synopsis ("ID", "FILE|-"), NULL for none */
    const char *summary; /* one line, lower case, no full stop */
    const char *text;    /* more paragraphs (may be NULL); lines of at most 78 */
    unsigned flags;      /* FM_CLI_* */
    fm_cli_opt opts[FM_CLI_OPTS_MAX]; /* ends at the first {NULL} */
    const char *examples[4];          /* shell lines, ends at NULL */
} fm_cli_cmd;

/* The tables, one per cmd_*.c, each ending with {.name = NULL}. */
extern const fm_cli_cmd fm_cli_init_cmds[], fm_cli_serve_cmds[], fm_cli_status_cmds[],
    fm_cli_device_cmds[], fm_cli_template_cmds[], fm_cli_user_cmds[], fm_cli_sim_cmds[],
    fm_cli_features_cmds[], fm_cli_model_cmds[], fm_cli_bench_cmds[], fm_cli_lake_cmds[],
    fm_cli_rules_cmds[], fm_cli_function_cmds[], fm_cli_api_cmds[];

/* Runs `fleetml` with argv as main() got it: help, the table check, then
 * the command. Returns the exit status. */
int fm_cli_main(int argc, char **argv);

int fm_cmd_init(int argc, char **argv);
int fm_cmd_serve(int argc, char **argv);
int fm_cmd_device(int argc, char **argv); /* add | disable | enable | revoke | shadow | run */
int fm_cmd_device_run(int argc, char **argv); /* `fleetml device run <id>` */
int fm_cmd_sim(int argc, char **argv);
int fm_cmd_features(int argc, char **argv);
int fm_cmd_model(int argc, char **argv);      /* train | info | predict */
int fm_cmd_lake(int argc, char **argv);       /* flush, check */
int fm_cmd_template(int argc, char **argv);
int fm_cmd_bench(int argc, char **argv);      /* pipeline */   /* add | list | disable | enable | claim-cert */
int fm_cmd_api(int argc, char **argv);        /* routes */
int fm_cmd_user(int argc, char **argv);       /* add | list | disable | enable | passwd | roles */
int fm_cmd_rules(int argc, char **argv);      /* list | put | delete | log */
int fm_cmd_function(int argc, char **argv);   /* list | call */
int fm_cmd_status(int argc, char **argv);     /* a running node at a glance */

/* Shared option handling: consumes `--data DIR` and `--set section.key=V`
 * (repeatable) from argv (compacting it, updating *argc), loads
 * <data>/fleetml.conf and applies the overrides in order. Returns 0 or 2
 * (usage/config error, already reported on stderr). */
int fm_cli_config(int *argc, char **argv, fm_config *cfg);

/* `fleetml model` registry subcommands (cmd_model_reg.c). */
int fm_cmd_model_push(int argc, char **argv);
int fm_cmd_model_versions(int argc, char **argv);
int fm_cmd_model_decide(int argc, char **argv, int status);
int fm_cmd_model_deploy(int argc, char **argv);
int fm_cmd_model_train_lake(int argc, char **argv);

/* Prints the synopsis of cmd (from its table) and "see 'fleetml help
 * <cmd>'" on stderr. */
void fm_cli_usage(const char *cmd);
/* Prints "fleetml <cmd>: <message>" and "see 'fleetml help <cmd>'" on
 * stderr; returns 2 (a usage error). cmd names the (sub)command. */
int fm_cli_usage_error(const char *cmd, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* A progress line on stderr, "[####    ]  40% what", redrawn in place;
 * percent 100 ends it with a new line. Only when stderr is a terminal:
 * otherwise (logs, pipes, scripts) nothing is printed. */
void fm_cli_progress(const char *what, int percent);

struct json_t;
/* Prints doc (taken) as indented JSON on stdout, one document. Returns 0,
 * or 1 when doc is NULL or cannot be encoded. */
int fm_cli_print_json(struct json_t *doc);

/* Finds `--name VALUE` in argv, removes both and returns VALUE (or NULL). */
const char *fm_cli_take_opt(int *argc, char **argv, const char *name);
/* Finds `--name` in argv, removes it and returns 1 (0 if absent). */
int fm_cli_take_flag(int *argc, char **argv, const char *name);

/* Parses a finite decimal number (the whole string). Returns 0 or
 * FM_EINVAL. */
int fm_cli_parse_double(const char *s, double *out);
/* Parses a non-negative decimal integer <= max (the whole string; "-1" and
 * trailing garbage are refused). Returns 0 or FM_EINVAL. */
int fm_cli_parse_u64(const char *s, uint64_t max, uint64_t *out);

/* Renders v in base 36 (lower case) into buf, for compact per-run
 * measurement-id prefixes; truncates to fit. */
void fm_cli_base36(uint64_t v, char *buf, size_t len);

#endif
