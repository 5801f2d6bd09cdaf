/*
 * fleetml configuration: an INI file (`<data>/fleetml.conf`) plus
 * command-line overrides (`--set section.key=value`).
 *
 *   [node]      id, log_level
 *   [broker]    mode (supervised|external), mosquitto, bind, port,
 *               service_port, host (external mode), max_payload
 *   [http]      bind, port
 *   [pipeline]  commit_window_us, batch_max, queue_max
 *   [store]     backend (sqlite)
 *   [lake]      backend (fs), dir, roll_bytes, roll_seconds
 *   [model]     dir
 *
 * Every key has a default; unknown sections or keys are errors so typos are
 * caught at start-up rather than silently ignored.
 */
#ifndef FLEETML_CONFIG_H
#define FLEETML_CONFIG_H

#include "fleetml/core.h"
#include <limits.h>

#ifndef PATH_MAX
#define PATH_MAX 4096
#endif

typedef struct fm_config {
    char data_dir[PATH_MAX];
    char node_id[64];
    int log_level; /* enum fm_log_level */

    char broker_mode[16]; /* "supervised" or "external" */
    char mosquitto_bin[PATH_MAX];
    char broker_bind[64];  /* device listener address */
    int broker_port;       /* device listener (mTLS) */
    int broker_service_port; /* loopback listener for the service (mTLS) */
    char broker_host[256]; /* host the service connects to */
    int max_payload;       /* bytes; larger measurements are rejected */

    char http_bind[64];
    int http_port;

    int commit_window_us;
    int batch_max;
    int queue_max;

    char store_backend[16];
    char lake_backend[16];
    char lake_dir[PATH_MAX];
    long lake_roll_bytes;
    int lake_roll_seconds;

    char model_dir[PATH_MAX];
} fm_config;

/* Fills c with defaults for the given data directory (NULL = "./var").
 * Never fails except FM_EINVAL when data_dir is too long. */
int fm_config_defaults(fm_config *c, const char *data_dir);

/* Sets one key ("section.key") from a string. Returns 0, or FM_EINVAL with
 * a message naming the key and what was wrong. c is unchanged on failure. */
int fm_config_set(fm_config *c, const char *key, const char *value, fm_errbuf *err);

/* Parses INI text (sections, `key = value`, `#`/`;` comments) into c.
 * Returns 0 or FM_EINVAL with "line N: ..." in err. On failure c may hold
 * keys set before the bad line. */
int fm_config_parse(fm_config *c, const char *text, fm_errbuf *err);

/* Loads path if it exists (a missing file is not an error). Returns 0,
 * FM_EINVAL (bad content), or FM_EIO. */
int fm_config_load(fm_config *c, const char *path, fm_errbuf *err);

/* Writes an annotated config file holding the current values. The caller
 * frees *out with fm_free. Returns 0 or FM_ENOMEM. */
int fm_config_render(const fm_config *c, char **out);

/* Convenience: joins data_dir and a relative path into buf. Returns buf, or
 * NULL when it does not fit. */
char *fm_config_path(const fm_config *c, const char *rel, char *buf, size_t len);

#endif
