/*
 * fleetml configuration: defaults, `section.key` setters, an INI parser and
 * a renderer. See include/fleetml/config.h for the interface.
 *
 * Every key is described once, in the `keys` table below: its type, where
 * it lives in fm_config, its accepted range and a help line. The setter,
 * the parser, the renderer and the "did you mean" hint all walk that table,
 * so adding a key is one line and the rendered file can never drift from
 * what the parser accepts.
 */
#include "fleetml/config.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum vtype {
    T_INT,      /* int field, decimal, within [min, max] */
    T_LONG,     /* long field, decimal, within [min, max] */
    T_LEVEL,    /* int field holding enum fm_log_level, written as its name */
    T_ENUM,     /* string field, one of choices */
    T_NODE_ID,  /* string field, [a-z0-9][a-z0-9-]* */
    T_HOST,     /* string field, address or host name without spaces */
    T_PATH,     /* string field, non-empty path */
    T_PATH_OPT  /* string field, path or empty (= subsystem default) */
};

typedef struct key_def {
    const char *section;
    const char *name;
    enum vtype type;
    size_t off;  /* offset of the field in fm_config */
    size_t size; /* size of string fields, including the NUL */
    long min, max;
    const char *const *choices; /* NULL-terminated, for T_ENUM */
    const char *help;
} key_def;

static const char *const broker_modes[] = {"supervised", "external", NULL};
static const char *const service_transports[] = {"unix", "tls", NULL};
/* The config accepts every backend the architecture plans for; a backend
 * that is not compiled in is reported by the store or lake when it opens,
 * with a message about the build rather than about the config syntax. */
static const char *const store_backends[] = {"sqlite", "postgres", NULL};
static const char *const lake_backends[] = {"fs", "s3", NULL};
static const char *const on_off[] = {"off", "on", NULL};
static const char *const s3_addressing[] = {"auto", "path", "virtual", NULL};
static const char *const s3_credentials[] = {"static", "role", NULL};
static const char *const level_names[] = {"debug", "info", "warn", "error", NULL};

#define FIELD_SIZE(f) sizeof(((fm_config *)0)->f)
#define K_STR(sec, nm, ty, f, ch, h) {sec, nm, ty, offsetof(fm_config, f), FIELD_SIZE(f), 0, 0, ch, h}
#define K_NUM(sec, nm, ty, f, lo, hi, h) {sec, nm, ty, offsetof(fm_config, f), 0, lo, hi, NULL, h}

/* The commit window is capped at 2 ms: it is added to the latency of every
 * measurement's acknowledgement, and the latency budget for the `ok` reply
 * leaves no more than that for batching. batch_max is capped so one SQLite
 * transaction stays short enough not to stall readers. */
static const key_def keys[] = {
    K_STR("node", "id", T_NODE_ID, node_id, NULL,
          "Name of this node in logs and lake object keys ([a-z0-9-], default: host name)."),
    K_NUM("node", "log_level", T_LEVEL, log_level, 0, 0, "Least severe level logged."),
    K_STR("broker", "mode", T_ENUM, broker_mode, broker_modes,
          "supervised: fleetml runs mosquitto itself; external: connect to broker.host."),
    K_STR("broker", "mosquitto", T_PATH, mosquitto_bin, NULL,
          "mosquitto executable (supervised mode)."),
    K_STR("broker", "bind", T_HOST, broker_bind, NULL,
          "Address of the device listener (mutual TLS)."),
    K_NUM("broker", "port", T_INT, broker_port, 1, 65535, "Device listener port (mutual TLS)."),
    K_NUM("broker", "service_port", T_INT, broker_service_port, 1, 65535,
          "Loopback listener the fleetml service connects to (mutual TLS)."),
    K_STR("broker", "service_transport", T_ENUM, broker_service_transport, service_transports,
          "Supervised mode: how the service reaches its broker. unix: a Unix socket in "
          "<data>/broker/service/, reachable only by the broker's user and root (no TLS); "
          "tls: the loopback listener broker.service_port with mutual TLS. External mode "
          "always uses TLS."),
    K_STR("broker", "host", T_HOST, broker_host, NULL,
          "Host the service connects to (the external broker in external mode)."),
    K_STR("broker", "url", T_PATH_OPT, broker_url, NULL,
          "External mode: the MQTT 5 broker the service connects to, mqtts://host:port "
          "(overrides broker.host and broker.service_port; empty: use those)."),
    K_STR("broker", "public_host", T_HOST, broker_public_host, NULL,
          "Host name devices are told to connect to after provisioning (must be in the "
          "broker certificate)."),
    K_NUM("broker", "public_port", T_INT, broker_public_port, 0, 65535,
          "Port devices are told to connect to (0 = broker.port)."),
    K_NUM("broker", "max_connections", T_INT, max_connections, 1, 10000000,
          "Most simultaneous connections on the device listener."),
    K_NUM("broker", "max_payload", T_INT, max_payload, 1024, 16 * 1024 * 1024,
          "Largest accepted MQTT payload in bytes (measurements are capped at 128 KiB "
          "by the contract regardless)."),
    K_STR("http", "bind", T_HOST, http_bind, NULL, "Address of the HTTP API."),
    K_NUM("http", "port", T_INT, http_port, 1, 65535, "Port of the HTTP API."),
    K_STR("http", "tls", T_ENUM, http_tls, on_off,
          "on: serve HTTPS (TLS >= 1.2) with the platform's server certificate "
          "(pki/broker.crt); off: plain HTTP (keep http.bind on loopback or behind a "
          "TLS-terminating proxy)."),
    K_NUM("http", "threads", T_INT, http_threads, 1, 64,
          "Threads answering HTTP requests (sign-ins spend ~50 ms of CPU each)."),
    K_STR("http", "trusted_proxies", T_PATH_OPT, http_trusted_proxies, NULL,
          "Comma-separated addresses of reverse proxies whose X-Forwarded-For is believed "
          "(empty: the peer address is the client address)."),
    K_NUM("http", "access_ttl_s", T_INT, http_access_ttl_s, 60, 86400,
          "Lifetime of access tokens in seconds."),
    K_STR("http", "mfa_roles", T_PATH_OPT, http_mfa_roles, NULL,
          "Comma-separated roles that must sign in with a second factor (TOTP) to use "
          "anything but their own account, e.g. admin,operator (empty: none)."),
    K_NUM("http", "per_address_limit", T_INT, http_per_address_limit, 0, 100000,
          "Most simultaneous connections from one client address (0 = no limit). Off when "
          "http.trusted_proxies is set: then it caps requests in flight per forwarded "
          "client address (429 beyond it)."),
    K_NUM("http", "header_timeout_s", T_INT, http_header_timeout_s, 1, 300,
          "Seconds a client has to send a whole request head; an idle keep-alive "
          "connection counts as waiting for one and is closed after it."),
    K_NUM("http", "body_min_rate", T_INT, http_body_min_rate, 0, 1 << 30,
          "Least average rate, in bytes per second after a 5 s grace, at which a request "
          "body must arrive, or the connection is closed (0 = no minimum)."),
    K_STR("ops", "bind", T_HOST, ops_bind, NULL,
          "Address of the operations listener (/healthz, /readyz, /metrics, /openapi.yaml; "
          "plain HTTP, no token): keep it on loopback or a management network."),
    K_NUM("ops", "port", T_INT, ops_port, 1, 65535, "Port of the operations listener."),
    K_NUM("pipeline", "commit_window_us", T_INT, commit_window_us, 0, 2000,
          "How long a batch may wait for more measurements before it is committed, in "
          "microseconds (0 = commit at once)."),
    K_NUM("pipeline", "keep_warm_us", T_INT, keep_warm_us, 0, 1000000,
          "While measurements arrive less often than this (in microseconds) but have come "
          "within the last minute, the commit thread scores one row with the model last "
          "used whenever it has been idle this long, so the next measurement finds the "
          "model in the CPU's caches (0 = off)."),
    K_NUM("pipeline", "batch_max", T_INT, batch_max, 1, 4096,
          "Most measurements committed in one transaction."),
    K_NUM("pipeline", "queue_max", T_INT, queue_max, 1, 16 * 1024 * 1024,
          "Most measurements waiting for a commit; beyond it devices get 'unavailable'."),
    K_NUM("pipeline", "workers", T_INT, pipeline_workers, 0, 16,
          "Threads that parse, validate and extract features in parallel (0 = the commit "
          "thread does it; default: number of CPUs)."),
    K_NUM("pipeline", "queue_max_bytes", T_LONG, queue_max_bytes, 1024 * 1024,
          64L * 1024 * 1024 * 1024,
          "Most payload bytes waiting in the pipeline; beyond it devices get 'unavailable'."),
    K_NUM("pipeline", "device_rate", T_INT, device_rate, 0, 1000000,
          "Measurements per second one device may send (0 = no limit); more are answered "
          "'rate_limited' so one device cannot crowd out the others."),
    K_NUM("pipeline", "device_burst", T_INT, device_burst, 1, 1000000,
          "How many measurements a device may send at once above its rate."),
    K_NUM("pipeline", "device_bytes_rate", T_INT, device_bytes_rate, 0, 1 << 30,
          "Payload bytes per second one device may publish, enforced by the broker plugin "
          "(0 = no limit); beyond it the broker refuses its messages."),
    K_NUM("pipeline", "device_bytes_burst", T_INT, device_bytes_burst, 1, 1 << 30,
          "How many payload bytes a device may publish at once above its byte rate."),
    K_STR("store", "backend", T_ENUM, store_backend, store_backends,
          "Database backend: sqlite (<data>/db) or postgres (store.url)."),
    K_STR("store", "url", T_PATH_OPT, store_url, NULL,
          "PostgreSQL connection URI, postgres://user@host:port/database (libpq: PGPASSWORD "
          "or ~/.pgpass keep the password out of it); a postgres:// URI selects the postgres "
          "backend by itself."),
    K_STR("lake", "backend", T_ENUM, lake_backend, lake_backends,
          "Data lake backend: fs (a directory) or s3 (any S3-compatible store)."),
    K_STR("lake", "dir", T_PATH_OPT, lake_dir, NULL,
          "Root of the file-system lake (empty = <data>/lake)."),
    K_STR("functions", "dir", T_PATH_OPT, functions_dir, NULL,
          "Where functions are deployed, one directory each (empty = <data>/functions)."),
    K_NUM("rules", "retry_base_ms", T_INT, rules_retry_base_ms, 100, 600000,
          "First retry of a failed rule delivery after this long, doubled per retry."),
    K_STR("rules", "loopback_webhooks", T_ENUM, rules_loopback_webhooks, on_off,
          "Allow webhooks to plain http:// on a loopback address (a receiver on this host; "
          "off: https:// only)."),
    K_NUM("lake", "roll_bytes", T_LONG, lake_roll_bytes, 4096, 1024L * 1024 * 1024,
          "Close a lake object once it holds this many bytes."),
    K_NUM("lake", "roll_seconds", T_INT, lake_roll_seconds, 1, 3600,
          "Close a lake object once it is this many seconds old."),
    K_STR("lake", "s3_bucket", T_PATH_OPT, lake_s3_bucket, NULL,
          "S3 bucket of the lake (lake.backend = s3)."),
    K_STR("lake", "s3_endpoint", T_PATH_OPT, lake_s3_endpoint, NULL,
          "S3 endpoint, scheme://host[:port] (empty = AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, "
          "else https://s3.<region>.amazonaws.com)."),
    K_STR("lake", "s3_region", T_PATH_OPT, lake_s3_region, NULL,
          "S3 region for signing (empty = AWS_REGION, AWS_DEFAULT_REGION, else us-east-1)."),
    K_STR("lake", "s3_prefix", T_PATH_OPT, lake_s3_prefix, NULL,
          "Prefix of every lake key in the bucket (e.g. fleetml/)."),
    K_STR("lake", "s3_addressing", T_ENUM, lake_s3_addressing, s3_addressing,
          "Bucket in the host name (virtual) or the path (path); auto: virtual on AWS, "
          "path elsewhere."),
    K_STR("lake", "s3_access_key_id", T_PATH_OPT, lake_s3_access_key_id, NULL,
          "S3 access key id (empty = AWS_ACCESS_KEY_ID)."),
    K_STR("lake", "s3_secret_access_key", T_PATH_OPT, lake_s3_secret_access_key, NULL,
          "S3 secret key (empty = AWS_SECRET_ACCESS_KEY; prefer the environment)."),
    K_STR("lake", "s3_credentials", T_ENUM, lake_s3_credentials, s3_credentials,
          "static: lake.s3_access_key_id / s3_secret_access_key, else AWS_ACCESS_KEY_ID, "
          "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN; role: temporary credentials of the "
          "machine's role (container credentials endpoint, else EC2 IMDSv2), renewed before "
          "they expire."),
    K_NUM("lake", "s3_part_bytes", T_LONG, lake_s3_part_bytes, 5L * 1024 * 1024,
          1024L * 1024 * 1024, "Objects larger than this are uploaded in parts of this size."),
    K_NUM("lake", "s3_timeout_s", T_INT, lake_s3_timeout_s, 1, 3600,
          "Time limit of one S3 request, in seconds."),
    K_NUM("pki", "device_cert_days", T_INT, device_cert_days, 1, 3650,
          "Lifetime of device certificates issued without a template (rotation, device add)."),
    K_NUM("pki", "rotation_grace_s", T_INT, rotation_grace_s, 0, 90 * 86400,
          "How long a device's old certificate keeps working after a rotation, in seconds."),
    K_STR("model", "dir", T_PATH, model_dir, NULL,
          "Directory of the viscosity model (relative paths are resolved against the "
          "working directory)."),
    K_NUM("model", "drift_psi_pct", T_INT, drift_psi_pct, 1, 10000,
          "Drift alert threshold: population stability index x 100 of any feature of a "
          "tenant's day against the version's training baseline (25 = 0.25)."),
    K_NUM("model", "drift_min_count", T_INT, drift_min_count, 1, 100000000,
          "Measurements of a tenant's day before its drift is judged."),
};
#define N_KEYS (sizeof keys / sizeof keys[0])

/* Longest "section.key" accepted from a file; longer ones cannot be known. */
#define KEY_MAX 64

/* ---- defaults ----------------------------------------------------------------- */

static void copy_str(char *dst, size_t size, const char *src)
{
    /* Zero-fill the whole field so two configs holding the same values
     * compare equal byte for byte (the round-trip tests rely on it). */
    memset(dst, 0, size);
    snprintf(dst, size, "%s", src);
}

/* Makes data_dir absolute when possible so that a daemon which later
 * changes directory, and the mosquitto it spawns, see the same paths. The
 * directory itself may not exist yet (first start), so the parent is
 * resolved instead and the last component appended. When neither resolves
 * the path is kept as given. */
static void absolutize(const char *in, char *out, size_t outlen)
{
    char tmp[PATH_MAX];
    char resolved[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s", in);
    size_t n = strlen(tmp);
    while (n > 1 && tmp[n - 1] == '/')
        tmp[--n] = '\0';
    if (realpath(tmp, resolved)) {
        copy_str(out, outlen, resolved);
        return;
    }
    char *slash = strrchr(tmp, '/');
    const char *base = slash ? slash + 1 : tmp;
    const char *parent = ".";
    if (slash == tmp)
        parent = "/";
    else if (slash) {
        *slash = '\0';
        parent = tmp;
    }
    if (strcmp(base, ".") != 0 && strcmp(base, "..") != 0 && realpath(parent, resolved)) {
        char joined[PATH_MAX];
        int w = snprintf(joined, sizeof joined, "%s%s%s", resolved,
                         strcmp(resolved, "/") == 0 ? "" : "/", base);
        if (w > 0 && (size_t)w < sizeof joined && (size_t)w < outlen) {
            copy_str(out, outlen, joined);
            return;
        }
    }
    copy_str(out, outlen, in);
}

/* Derives the default node id from the host name: the first label,
 * lower-cased, with anything outside [a-z0-9-] turned into '-'. */
static void default_node_id(char *out, size_t size)
{
    char host[256] = "";
    size_t n = 0;
    memset(out, 0, size);
    if (gethostname(host, sizeof host - 1) == 0) {
        host[sizeof host - 1] = '\0';
        for (const char *p = host; *p && *p != '.' && n + 1 < size; p++) {
            char ch = (char)tolower((unsigned char)*p);
            bool ok = (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9');
            if (!ok && n == 0)
                continue; /* an id starts with a letter or digit */
            out[n++] = ok ? ch : '-';
        }
    }
    while (n > 0 && out[n - 1] == '-')
        out[--n] = '\0';
    if (n == 0)
        copy_str(out, size, "node1");
}

int fm_config_defaults(fm_config *c, const char *data_dir)
{
    if (!data_dir)
        data_dir = "./var";
    size_t n = strlen(data_dir);
    if (n == 0 || n >= sizeof c->data_dir)
        return FM_EINVAL;
    memset(c, 0, sizeof *c);
    absolutize(data_dir, c->data_dir, sizeof c->data_dir);
    default_node_id(c->node_id, sizeof c->node_id);
    c->log_level = FM_LOG_INFO;
    copy_str(c->broker_mode, sizeof c->broker_mode, "supervised");
    copy_str(c->mosquitto_bin, sizeof c->mosquitto_bin, "/usr/sbin/mosquitto");
    copy_str(c->broker_bind, sizeof c->broker_bind, "0.0.0.0");
    c->broker_port = 8883;
    c->broker_service_port = 8884;
    copy_str(c->broker_service_transport, sizeof c->broker_service_transport, "unix");
    copy_str(c->broker_host, sizeof c->broker_host, "127.0.0.1");
    copy_str(c->broker_public_host, sizeof c->broker_public_host, "localhost");
    c->broker_public_port = 0;
    c->device_cert_days = 825;
    c->rotation_grace_s = 86400;
    c->max_payload = 131072;
    copy_str(c->http_bind, sizeof c->http_bind, "127.0.0.1");
    c->http_port = 8080;
    copy_str(c->http_tls, sizeof c->http_tls, "off");
    c->http_threads = 4;
    c->http_access_ttl_s = 900;
    c->http_per_address_limit = 64;
    c->http_header_timeout_s = 10;
    c->http_body_min_rate = 1024;
    copy_str(c->ops_bind, sizeof c->ops_bind, "127.0.0.1");
    c->ops_port = 9180;
    c->commit_window_us = 0;
    c->keep_warm_us = 2000;
    c->queue_max_bytes = 256L * 1024 * 1024;
    c->device_rate = 20;
    c->device_burst = 100;
    c->device_bytes_rate = 512 * 1024;
    c->device_bytes_burst = 1024 * 1024;
    c->max_connections = 50000;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    c->pipeline_workers = ncpu < 1 ? 1 : ncpu > 16 ? 16 : (int)ncpu;
    c->batch_max = 256;
    c->queue_max = 65536;
    copy_str(c->store_backend, sizeof c->store_backend, "sqlite");
    copy_str(c->lake_backend, sizeof c->lake_backend, "fs");
    if (!fm_config_path(c, "lake", c->lake_dir, sizeof c->lake_dir))
        c->lake_dir[0] = '\0'; /* too long: the lake falls back on its own */
    if (!fm_config_path(c, "functions", c->functions_dir, sizeof c->functions_dir))
        c->functions_dir[0] = '\0';
    c->rules_retry_base_ms = 1000;
    copy_str(c->rules_loopback_webhooks, sizeof c->rules_loopback_webhooks, "off");
    c->lake_roll_bytes = 8L * 1024 * 1024;
    c->lake_roll_seconds = 60;
    copy_str(c->lake_s3_addressing, sizeof c->lake_s3_addressing, "auto");
    copy_str(c->lake_s3_credentials, sizeof c->lake_s3_credentials, "static");
    c->lake_s3_part_bytes = 16L * 1024 * 1024;
    c->lake_s3_timeout_s = 30;
    const char *md = getenv("FM_MODEL_DIR");
    c->drift_psi_pct = 25;
    c->drift_min_count = 200;
    copy_str(c->model_dir, sizeof c->model_dir,
             md && *md && strlen(md) < sizeof c->model_dir ? md : "models/viscosity");
    return 0;
}

/* ---- set ----------------------------------------------------------------------- */

static const key_def *find_key(const char *key)
{
    const char *dot = strchr(key, '.');
    if (!dot)
        return NULL;
    size_t slen = (size_t)(dot - key);
    for (size_t i = 0; i < N_KEYS; i++)
        if (strlen(keys[i].section) == slen && strncmp(key, keys[i].section, slen) == 0 &&
            strcmp(dot + 1, keys[i].name) == 0)
            return &keys[i];
    return NULL;
}

/* Edit distance, used only to suggest a known key for a misspelt one. */
static size_t edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > KEY_MAX || lb > KEY_MAX)
        return SIZE_MAX;
    size_t row[KEY_MAX + 1];
    for (size_t j = 0; j <= lb; j++)
        row[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j];
            size_t best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best)
                best = up + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

static int unknown_key(const char *key, fm_errbuf *err)
{
    const key_def *best = NULL;
    size_t best_d = 3; /* suggest only close matches */
    char full[KEY_MAX + 1];
    for (size_t i = 0; i < N_KEYS; i++) {
        snprintf(full, sizeof full, "%s.%s", keys[i].section, keys[i].name);
        size_t d = edit_distance(key, full);
        if (d < best_d) {
            best_d = d;
            best = &keys[i];
        }
    }
    if (best)
        return fm_errf(err, FM_EINVAL, "unknown key '%.*s' (did you mean '%s.%s'?)", KEY_MAX,
                       key, best->section, best->name);
    return fm_errf(err, FM_EINVAL, "unknown key '%.*s'", KEY_MAX, key);
}

/* Strict decimal: optional sign, digits, nothing else. strtol alone would
 * accept leading blanks, "0x10" with base 0, or an empty string as 0. */
static int parse_long(const char *key, const char *v, long min, long max, long *out,
                      fm_errbuf *err)
{
    const char *p = v;
    if (*p == '-' || *p == '+')
        p++;
    if (!isdigit((unsigned char)*p))
        return fm_errf(err, FM_EINVAL, "%s: '%.64s' is not an integer", key, v);
    for (const char *q = p; *q; q++)
        if (!isdigit((unsigned char)*q))
            return fm_errf(err, FM_EINVAL, "%s: '%.64s' is not an integer", key, v);
    errno = 0;
    long x = strtol(v, NULL, 10);
    if (errno == ERANGE || x < min || x > max)
        return fm_errf(err, FM_EINVAL, "%s: %.64s is outside %ld..%ld", key, v, min, max);
    *out = x;
    return 0;
}

/* Checks a free-form string value. Control characters are refused because
 * they could not be written back to the file, and a '#' or ';' after a
 * blank because the parser would read it back as the start of a comment. */
static int check_text(const char *key, const char *v, size_t size, bool allow_empty,
                      bool allow_space, fm_errbuf *err)
{
    size_t n = strlen(v);
    if (n == 0 && !allow_empty)
        return fm_errf(err, FM_EINVAL, "%s: must not be empty", key);
    if (n >= size)
        return fm_errf(err, FM_EINVAL, "%s: value is %zu bytes, longer than the limit of %zu",
                       key, n, size - 1);
    if (n > 0 && (isspace((unsigned char)v[0]) || isspace((unsigned char)v[n - 1])))
        return fm_errf(err, FM_EINVAL, "%s: leading or trailing white space", key);
    if (v[0] == '#' || v[0] == ';')
        return fm_errf(err, FM_EINVAL, "%s: a value starting with '%c' would be read back as a comment",
                       key, v[0]);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)v[i];
        if (ch < 0x20 || ch == 0x7f)
            return fm_errf(err, FM_EINVAL, "%s: control character at offset %zu", key, i);
        if (ch == ' ' && !allow_space)
            return fm_errf(err, FM_EINVAL, "%s: '%.64s' must not contain spaces", key, v);
        if ((ch == '#' || ch == ';') && i > 0 && isspace((unsigned char)v[i - 1]))
            return fm_errf(err, FM_EINVAL,
                           "%s: '%c' after a blank would be read back as a comment", key, ch);
    }
    return 0;
}

static bool node_id_valid(const char *s)
{
    if (!((s[0] >= 'a' && s[0] <= 'z') || (s[0] >= '0' && s[0] <= '9')))
        return false;
    for (const char *p = s; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '-'))
            return false;
    return true;
}

int fm_config_set(fm_config *c, const char *key, const char *value, fm_errbuf *err)
{
    if (!c || !key || !value)
        return fm_errf(err, FM_EINVAL, "missing key or value");
    const key_def *k = find_key(key);
    if (!k)
        return unknown_key(key, err);
    void *field = (char *)c + k->off;
    long x = 0;
    int rc;
    switch (k->type) {
    case T_INT:
    case T_LONG:
        if ((rc = parse_long(key, value, k->min, k->max, &x, err)) != 0)
            return rc;
        if (k->type == T_INT)
            *(int *)field = (int)x;
        else
            *(long *)field = x;
        return 0;
    case T_LEVEL: {
        enum fm_log_level lvl;
        if (fm_log_level_parse(value, &lvl) != 0)
            return fm_errf(err, FM_EINVAL,
                           "%s: '%.64s' is not one of debug, info, warn, error", key, value);
        *(int *)field = (int)lvl;
        return 0;
    }
    case T_ENUM:
        for (const char *const *ch = k->choices; *ch; ch++)
            if (strcmp(value, *ch) == 0) {
                copy_str(field, k->size, value);
                return 0;
            }
        {
            char list[128] = "";
            for (const char *const *ch = k->choices; *ch; ch++) {
                size_t used = strlen(list);
                snprintf(list + used, sizeof list - used, "%s%s", used ? ", " : "", *ch);
            }
            return fm_errf(err, FM_EINVAL, "%s: '%.64s' is not one of %s", key, value, list);
        }
    case T_NODE_ID:
        if ((rc = check_text(key, value, k->size, false, false, err)) != 0)
            return rc;
        if (!node_id_valid(value))
            return fm_errf(err, FM_EINVAL,
                           "%s: '%.64s' must be [a-z0-9] followed by [a-z0-9-]", key, value);
        copy_str(field, k->size, value);
        return 0;
    case T_HOST:
        if ((rc = check_text(key, value, k->size, false, false, err)) != 0)
            return rc;
        copy_str(field, k->size, value);
        return 0;
    case T_PATH:
    case T_PATH_OPT:
        if ((rc = check_text(key, value, k->size, k->type == T_PATH_OPT, true, err)) != 0)
            return rc;
        copy_str(field, k->size, value);
        /* One setting selects PostgreSQL: a postgres:// URI in store.url. */
        if (field == (void *)c->store_url &&
            (strncmp(value, "postgres://", 11) == 0 || strncmp(value, "postgresql://", 13) == 0))
            copy_str(c->store_backend, sizeof c->store_backend, "postgres");
        return 0;
    }
    return fm_errf(err, FM_EINVAL, "%s: unsupported key type", key);
}

/* ---- parse --------------------------------------------------------------------- */

static bool section_known(const char *s, size_t n)
{
    for (size_t i = 0; i < N_KEYS; i++)
        if (strlen(keys[i].section) == n && strncmp(keys[i].section, s, n) == 0)
            return true;
    return false;
}

/* Trims blanks from both ends of [*b, *e). */
static void trim(const char **b, const char **e)
{
    while (*b < *e && isspace((unsigned char)**b))
        (*b)++;
    while (*e > *b && isspace((unsigned char)(*e)[-1]))
        (*e)--;
}

int fm_config_parse(fm_config *c, const char *text, fm_errbuf *err)
{
    if (!c || !text)
        return fm_errf(err, FM_EINVAL, "no configuration text");
    char section[KEY_MAX + 1] = "";
    int first_line[N_KEYS] = {0}; /* where each key was set, to catch repeats */
    int lineno = 0;
    const char *p = text;
    while (*p) {
        lineno++;
        const char *b = p;
        const char *e = strchr(p, '\n');
        if (!e)
            e = p + strlen(p);
        p = *e ? e + 1 : e;
        trim(&b, &e);
        if (b == e || *b == '#' || *b == ';')
            continue;

        if (*b == '[') {
            const char *close = memchr(b, ']', (size_t)(e - b));
            if (!close)
                return fm_errf(err, FM_EINVAL, "line %d: section header is missing ']'", lineno);
            const char *after = close + 1;
            const char *tail = e;
            trim(&after, &tail);
            if (after != tail && *after != '#' && *after != ';')
                return fm_errf(err, FM_EINVAL, "line %d: unexpected text after ']'", lineno);
            const char *sb = b + 1, *se = close;
            trim(&sb, &se);
            size_t sn = (size_t)(se - sb);
            if (sn == 0)
                return fm_errf(err, FM_EINVAL, "line %d: empty section name", lineno);
            if (!section_known(sb, sn))
                return fm_errf(err, FM_EINVAL,
                               "line %d: unknown section [%.*s] (known: node, broker, http, "
                               "pipeline, store, lake, pki, model)",
                               lineno, (int)(sn > KEY_MAX ? KEY_MAX : sn), sb);
            memcpy(section, sb, sn);
            section[sn] = '\0';
            continue;
        }

        const char *eq = memchr(b, '=', (size_t)(e - b));
        if (!eq)
            return fm_errf(err, FM_EINVAL, "line %d: expected 'key = value' or '[section]'",
                           lineno);
        const char *kb = b, *ke = eq, *vb = eq + 1, *ve = e;
        trim(&kb, &ke);
        trim(&vb, &ve);
        if (kb == ke)
            return fm_errf(err, FM_EINVAL, "line %d: missing key before '='", lineno);
        if (!section[0])
            return fm_errf(err, FM_EINVAL, "line %d: key '%.*s' is outside any [section]",
                           lineno, (int)(ke - kb > KEY_MAX ? KEY_MAX : ke - kb), kb);
        /* An inline comment starts at a '#' or ';' that follows a blank, so
         * "dir = /srv/a#b" keeps its '#' but "port = 1 # note" loses the note. */
        for (const char *q = vb + 1; q < ve; q++)
            if ((*q == '#' || *q == ';') && isspace((unsigned char)q[-1])) {
                ve = q;
                trim(&vb, &ve);
                break;
            }
        if (vb < ve && (*vb == '#' || *vb == ';'))
            ve = vb; /* "key = # comment": an empty value */

        char key[2 * KEY_MAX + 2];
        if ((size_t)(ke - kb) > KEY_MAX)
            return fm_errf(err, FM_EINVAL, "line %d: key is too long", lineno);
        snprintf(key, sizeof key, "%s.%.*s", section, (int)(ke - kb), kb);
        size_t vn = (size_t)(ve - vb);
        if (vn >= PATH_MAX)
            return fm_errf(err, FM_EINVAL, "line %d: %s: value is too long", lineno, key);
        char value[PATH_MAX];
        memcpy(value, vb, vn);
        value[vn] = '\0';

        const key_def *k = find_key(key);
        if (k) {
            size_t idx = (size_t)(k - keys);
            if (first_line[idx])
                return fm_errf(err, FM_EINVAL, "line %d: %s is already set on line %d", lineno,
                               key, first_line[idx]);
            first_line[idx] = lineno;
        }
        fm_errbuf inner;
        if (fm_config_set(c, key, value, &inner) != 0)
            return fm_errf(err, FM_EINVAL, "line %d: %s", lineno, inner.msg);
    }
    return 0;
}

int fm_config_load(fm_config *c, const char *path, fm_errbuf *err)
{
    if (!c || !path)
        return fm_errf(err, FM_EINVAL, "no configuration path");
    char *text = NULL;
    size_t len = 0;
    int rc = fm_read_file(path, &text, &len);
    if (rc == FM_ENOTFOUND)
        return 0;
    if (rc == FM_ENOMEM)
        return fm_errf(err, FM_ENOMEM, "out of memory reading the configuration");
    if (rc != 0)
        return fm_errf(err, FM_EIO, "cannot read the configuration file");
    if (strlen(text) != len)
        rc = fm_errf(err, FM_EINVAL, "file contains a NUL byte");
    else
        rc = fm_config_parse(c, text, err);
    fm_free(text);
    return rc;
}

/* ---- render -------------------------------------------------------------------- */

int fm_config_render(const fm_config *c, char **out)
{
    fm_strbuf o = {0};
    *out = NULL;
    fm_strbuf_printf(&o,
         "# fleetml configuration.\n"
         "# Every key is shown with its current value. Unknown sections or keys are\n"
         "# errors. Comments start with '#' or ';' at the start of a line, or after a\n"
         "# blank following a value. Values are not quoted.\n"
         "#\n"
         "# data directory: %s\n"
         "# (chosen with --data on the command line; it is not a key in this file)\n",
         c->data_dir);
    const char *cur = "";
    for (size_t i = 0; i < N_KEYS; i++) {
        const key_def *k = &keys[i];
        if (strcmp(cur, k->section) != 0) {
            cur = k->section;
            fm_strbuf_printf(&o, "\n[%s]\n", cur);
        }
        fm_strbuf_printf(&o, "# %s", k->help);
        const void *field = (const char *)c + k->off;
        switch (k->type) {
        case T_INT:
            fm_strbuf_printf(&o, " Range %ld..%ld.\n%s = %d\n", k->min, k->max, k->name, *(const int *)field);
            break;
        case T_LONG:
            fm_strbuf_printf(&o, " Range %ld..%ld.\n%s = %ld\n", k->min, k->max, k->name,
                 *(const long *)field);
            break;
        case T_LEVEL: {
            int lvl = *(const int *)field;
            fm_strbuf_printf(&o, " One of: debug, info, warn, error.\n%s = %s\n", k->name,
                 lvl >= FM_LOG_DEBUG && lvl <= FM_LOG_ERROR ? level_names[lvl] : "info");
            break;
        }
        case T_ENUM:
            fm_strbuf_printf(&o, " One of:");
            for (const char *const *ch = k->choices; *ch; ch++)
                fm_strbuf_printf(&o, "%s %s", ch == k->choices ? "" : ",", *ch);
            fm_strbuf_printf(&o, ".\n%s = %s\n", k->name, (const char *)field);
            break;
        default:
            fm_strbuf_printf(&o, "\n%s = %s\n", k->name, (const char *)field);
            break;
        }
    }
    return fm_strbuf_take(&o, out, NULL);
}

/* ---- paths --------------------------------------------------------------------- */

char *fm_config_path(const fm_config *c, const char *rel, char *buf, size_t len)
{
    if (!c || !rel || !buf || len == 0)
        return NULL;
    int n;
    if (rel[0] == '/') {
        n = snprintf(buf, len, "%s", rel);
    } else {
        size_t dl = strlen(c->data_dir);
        bool slash = dl > 0 && c->data_dir[dl - 1] == '/';
        n = snprintf(buf, len, "%s%s%s", c->data_dir, slash || !*rel ? "" : "/", rel);
    }
    if (n < 0 || (size_t)n >= len)
        return NULL;
    return buf;
}
