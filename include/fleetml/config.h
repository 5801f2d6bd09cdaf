/*
 * fleetml configuration: an INI file (`<data>/fleetml.conf`) plus
 * command-line overrides (`--set section.key=value`).
 *
 *   [node]      id, log_level
 *   [broker]    mode (supervised|external), mosquitto, bind, port,
 *               service_port, host (external mode), max_payload
 *   [http]      bind, port, tls, threads, trusted_proxies, access_ttl_s,
 *               mfa_roles
 *   [pipeline]  commit_window_us, keep_warm_us, batch_max, queue_max
 *   [store]     backend (sqlite)
 *   [lake]      backend (fs), dir, roll_bytes, roll_seconds
 *   [model]     dir
 *   [functions] dir;  [rules] retry_base_ms, loopback_webhooks
 *
 * Every key has a default; unknown sections or keys are errors so typos are
 * caught at start-up rather than silently ignored.
 *
 * Accepted values (fm_config_set refuses anything else):
 *   node.id                 [a-z0-9][a-z0-9-]*, < 64 bytes; default: the
 *                           host name's first label, lower-cased, other
 *                           characters turned into '-' (fallback "node1")
 *   node.log_level          debug | info | warn | error        (info)
 *   broker.mode             supervised | external              (supervised)
 *   broker.mosquitto        non-empty path                     (/usr/sbin/mosquitto)
 *   broker.bind, .host      non-empty, no blanks               (0.0.0.0, 127.0.0.1)
 *   broker.port             1..65535                           (8883)
 *   broker.service_port     1..65535                           (8884)
 *   broker.max_payload      1024..16777216 bytes               (131072)
 *   http.bind               non-empty, no blanks               (127.0.0.1)
 *   http.port               1..65535                           (8080)
 *   http.tls                off | on                           (off)
 *   http.threads            1..64                              (4)
 *   http.trusted_proxies    comma-separated addresses          ("")
 *   http.access_ttl_s       60..86400                          (900)
 *   http.mfa_roles          comma-separated roles              ("")
 *   pipeline.commit_window_us 0..2000 (the window is part of every ack's
 *                           latency, so it is capped at 2 ms)   (0)
 *   pipeline.keep_warm_us   0..1000000 (idle model call period) (2000)
 *   pipeline.batch_max      1..4096                            (256)
 *   pipeline.queue_max      1..16777216                        (65536)
 *   store.backend           sqlite | postgres (postgres: accepted, not built)
 *   lake.backend            fs | s3 (s3: accepted, not built)   (fs)
 *   lake.dir                path, or empty for <data>/lake     (<data>/lake)
 *   functions.dir           path, or empty for <data>/functions (<data>/functions)
 *   rules.retry_base_ms     100..600000                        (1000)
 *   rules.loopback_webhooks off | on                           (off)
 *   lake.roll_bytes         4096..1073741824                   (8388608)
 *   lake.roll_seconds       1..3600                            (60)
 *   model.dir               non-empty path                     ($FM_MODEL_DIR if
 *                           set, else "models/viscosity", relative to the
 *                           working directory)
 * Integers are plain decimal. String values are not quoted and may not hold
 * control characters, leading/trailing blanks, or a '#'/';' at the start or
 * after a blank (those would be read back as comments). Cross-key rules
 * (e.g. queue_max >= batch_max) are left to the subsystems.
 *
 * File syntax: `[section]` lines, `key = value` lines, blank lines, and
 * comments: a line starting with '#' or ';', or the rest of a line from a
 * '#'/';' that follows a blank. A key may appear only once per file.
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
    char broker_service_transport[8]; /* supervised mode: "unix" (socket) or "tls" (port) */
    char broker_host[256]; /* host the service connects to */
    char broker_url[320];  /* external mode: mqtts://host:port (overrides host, service_port) */
    char broker_public_host[256]; /* told to devices after provisioning */
    int broker_public_port;       /* 0 = broker_port */
    int max_connections;          /* device listener connection cap */
    int max_payload;       /* bytes; larger measurements are rejected */

    char http_bind[64];
    int http_port;
    char http_tls[8];       /* "off" | "on" */
    int http_threads;
    char http_trusted_proxies[256];
    int http_access_ttl_s;
    char http_mfa_roles[128];
    int http_per_address_limit; /* connections per client address (0 = none) */
    int http_header_timeout_s;  /* time to send a whole request head */
    int http_body_min_rate;     /* bytes/s a request body must average (0 = none) */

    char ops_bind[64];          /* health, readiness, metrics, OpenAPI */
    int ops_port;

    int commit_window_us;
    int keep_warm_us; /* idle model call period while traffic is sparse (0 = off) */
    int batch_max;
    int queue_max;
    int pipeline_workers; /* threads that parse and extract features */
    long queue_max_bytes; /* payload bytes waiting in the pipeline at most */
    int device_rate;      /* measurements per second per device (0 = no limit) */
    int device_burst;     /* ... with this many at once */
    int device_bytes_rate;  /* payload bytes per second per device, enforced by the
                               broker plugin (0 = no limit) */
    int device_bytes_burst; /* ... with this many at once */

    char store_backend[16];
    char store_url[512];          /* postgres://user@host:port/db (store.backend = postgres) */
    char lake_backend[16];
    char lake_dir[PATH_MAX];
    char functions_dir[PATH_MAX]; /* <data>/functions by default */
    int rules_retry_base_ms;
    char rules_loopback_webhooks[8]; /* "off" | "on" */
    long lake_roll_bytes;
    int lake_roll_seconds;
    /* lake.backend = s3 (src/lake/s3.c); empty strings take the standard
     * AWS environment variables, then the defaults the backend documents. */
    char lake_s3_bucket[64];
    char lake_s3_endpoint[256];   /* scheme://host[:port]; "" = AWS for the region */
    char lake_s3_region[32];
    char lake_s3_prefix[128];     /* prepended to every key, e.g. "fleetml/" */
    char lake_s3_addressing[16];  /* auto | path | virtual */
    char lake_s3_access_key_id[128];
    char lake_s3_secret_access_key[128];
    char lake_s3_credentials[16]; /* static (config / AWS_* env) | role */
    long lake_s3_part_bytes;      /* objects above this go up in parts of this size */
    int lake_s3_timeout_s;        /* per request */

    char model_dir[PATH_MAX];
    int drift_psi_pct;      /* PSI alert threshold x 100 (25 = 0.25) */
    int drift_min_count;    /* measurements a day before drift is judged */

    int device_cert_days;  /* certificates issued without a template */
    int rotation_grace_s;  /* old certificate validity after a rotation */
} fm_config;

/* Fills c with defaults for the given data directory (NULL = "./var").
 * data_dir is made absolute when it or its parent exists (realpath), else
 * kept as given. Never fails except FM_EINVAL when data_dir is empty or too
 * long. */
int fm_config_defaults(fm_config *c, const char *data_dir);

/* Sets one key ("section.key") from a string. Returns 0, or FM_EINVAL with
 * a message naming the key and what was wrong. c is unchanged on failure. */
int fm_config_set(fm_config *c, const char *key, const char *value, fm_errbuf *err);

/* Parses INI text (sections, `key = value`, `#`/`;` comments) into c.
 * Returns 0 or FM_EINVAL with "line N: ..." in err. On failure c may hold
 * keys set before the bad line. */
int fm_config_parse(fm_config *c, const char *text, fm_errbuf *err);

/* Loads path if it exists (a missing file is not an error). Returns 0,
 * FM_EINVAL (bad content, or path NULL), FM_ENOMEM, or FM_EIO. */
int fm_config_load(fm_config *c, const char *path, fm_errbuf *err);

/* Writes an annotated config file holding the current values. The caller
 * frees *out with fm_free. Returns 0 or FM_ENOMEM. */
int fm_config_render(const fm_config *c, char **out);

/* Convenience: joins data_dir and a relative path into buf (an absolute
 * rel is copied as is). Returns buf, or NULL when it does not fit or an
 * argument is NULL. */
char *fm_config_path(const fm_config *c, const char *rel, char *buf, size_t len);

#endif
