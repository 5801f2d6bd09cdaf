/*
 * `fleetml` subcommands. Each returns a process exit status (0 ok, 1 runtime
 * failure, 2 usage error) and prints human-facing output on stdout, errors
 * on stderr.
 */
#ifndef FLEETML_CLI_H
#define FLEETML_CLI_H

#include "fleetml/config.h"

#include <stdint.h>

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
