/*
 * The device registry service (cloud side of device identity): fleet
 * provisioning by claim, certificate rotation, device shadows, and keeping
 * the broker plugin's view of devices current.
 *
 * It runs one thread per node with its own store handle and the CA. Work
 * arrives two ways: MQTT messages routed to it by `fleetml serve`, and the
 * registry event log in the database (changes made by the CLI, the API or
 * other nodes), which it polls every 200 ms and turns into control messages
 * for the broker plugin (`$CONTROL/fleetml/v1`), shadow deltas, a fresh
 * registry snapshot file for the plugin and an up-to-date CRL.
 */
#ifndef FLEETML_REGISTRY_H
#define FLEETML_REGISTRY_H

#include "fleetml/config.h"
#include "fleetml/core.h"
#include "fleetml/pipeline.h"
#include "fleetml/store.h"

#define FM_SHADOW_MAX_BYTES 8192
#define FM_CONTROL_TOPIC "$CONTROL/fleetml/v1"
/* The broker plugin reports device connects and disconnects on
 * FM_PRESENCE_ROOT<device> ({"device":id,"online":bool,"at_ms":ms,"boot":id},
 * retained); only the broker itself can publish there (devices are
 * confined to fleet/<id>/...). The service subscribes to FM_PRESENCE_SUB. */
#define FM_PRESENCE_ROOT "$fleetml/v1/presence/"
#define FM_PRESENCE_SUB "$fleetml/v1/presence/+"
/* The broker plugin reports the publishes it refused to over-rate devices
 * here, at most once a second, as deltas:
 * {"refused_messages":n,"refused_bytes":b} (QoS 0). */
#define FM_ADMISSION_TOPIC "$fleetml/v1/admission"

/* ---- shadow documents (pure functions, shadow.c) ------------------------- */

/* Merges patch into doc in place (both JSON objects, as jansson json_t*):
 * keys in patch replace doc's, objects merge recursively, a null value
 * deletes the key. Returns 0 or FM_ENOMEM. */
struct json_t;
int fm_shadow_merge(struct json_t *doc, struct json_t *patch);

/* "active", "disabled" or "revoked" (enum fm_device_status); static. */
const char *fm_device_status_name(int status);
/* A device as the API (schema Device) and `fleetml device list --json`
 * show it: id, tenant, status, group, serial_number, model, firmware,
 * created_at, online, last_seen, cert_expires_at, the presence read from
 * st. New reference; NULL when out of memory. */
struct json_t *fm_device_json(fm_store *st, const fm_device *d);
/* A provisioning template as the API (schema Template) and `fleetml
 * template list --json` show it. New reference; NULL when out of memory. */
struct json_t *fm_template_json(const fm_template *t);
/* The part of desired that differs from reported (recursively for
 * objects); a new object, possibly empty. NULL on allocation failure. */
struct json_t *fm_shadow_delta(struct json_t *desired, struct json_t *reported);

/* ---- provisioning requests (pure function, request.c) -------------------- */

/* A parsed fleet/provisioning/<client>/request payload. Ownership: doc is
 * the parsed JSON document and is owned by the struct; serial, csr_pem,
 * model and firmware point into it and stay valid until
 * fm_provision_request_free (model and firmware are "" when absent). */
typedef struct fm_provision_request {
    struct json_t *doc;
    const char *serial;   /* 1..64 chars of [A-Za-z0-9_-], == client id after "prov-" */
    const char *csr_pem;  /* at most 16384 chars; not yet checked as a CSR */
    size_t csr_len;       /* strlen(csr_pem) */
    const char *model;    /* printable, <= 64 chars */
    const char *firmware; /* printable, <= 64 chars */
} fm_provision_request;

/* Parses and checks a provisioning request payload (len bytes, not
 * necessarily NUL-terminated) sent by MQTT client client_id: a JSON object
 * (no duplicate keys) with a string serial of 1..64 characters of
 * [A-Za-z0-9_-] equal to client_id after "prov-", a string csr of at most
 * 16384 characters, and optional strings model and firmware of at most 64
 * printable characters. The CSR itself is checked later by fm_csr_parse.
 * Returns 0 and fills *out (release with fm_provision_request_free), or
 * FM_EINVAL with code (code_len >= 16) set to "invalid_request" and the
 * message for the device in err; *out then holds nothing to free. */
int fm_provision_request_parse(const char *payload, size_t len, const char *client_id,
                               fm_provision_request *out, char *code, size_t code_len,
                               fm_errbuf *err);
/* Releases what fm_provision_request_parse filled; safe on a zeroed struct
 * and idempotent. */
void fm_provision_request_free(fm_provision_request *req);

/* ---- registry service ------------------------------------------------------ */

/* An MQTT message for the registry, with what the broker plugin stamped on
 * it. Borrowed for the duration of fm_registry_submit. */
typedef struct fm_regmsg_in {
    const char *topic;
    const void *payload;
    size_t len;
    const char *response_topic;
    const void *corr;
    size_t corr_len;
    const char *claim_template; /* user property fleetml-claim-template */
    const char *cert_serial;    /* user property fleetml-cert-serial */
} fm_regmsg_in;

typedef struct fm_registry fm_registry;

typedef struct fm_registry_opts {
    const fm_config *cfg;
    fm_publish_fn publish; /* QoS 1 publish; must be thread-safe */
    void *ud;
    /* Mark every device offline at start (the broker is starting empty,
     * as a supervised broker does). */
    int reset_presence;
    /* Optional: called on the registry's thread with ud for every device
     * event it follows in the log (the device's id; "" when the event
     * names none), so caches of device rows can drop them. */
    void (*device_changed)(void *ud, const char *device_id);
} fm_registry_opts;

/* Loads the CA, opens a store handle, writes the snapshot and CRL, and
 * starts the thread. Returns 0 and *out, or an FM_E* code with err set. */
int fm_registry_start(const fm_registry_opts *opts, fm_registry **out, fm_errbuf *err);

/* True when topic is one the registry handles: fleet/provisioning/+/request,
 * fleet/+/cert/rotate, fleet/+/shadow/update, fleet/+/shadow/get and
 * FM_PRESENCE_SUB. */
int fm_registry_handles(const char *topic);

/* Copies m into the registry's queue. Returns 0, FM_EBUSY (queue full) or
 * FM_ENOMEM. Thread-safe. */
int fm_registry_submit(fm_registry *r, const fm_regmsg_in *m);

/* Tells the registry the service (re)connected to the broker: it rewrites
 * the snapshot and asks the plugin to reload it, so nothing changed while
 * the connection was down is missed. Thread-safe, non-blocking. */
void fm_registry_resync(fm_registry *r);

void fm_registry_stop(fm_registry *r);

/* Writes <data>/broker/registry.json (the plugin's snapshot) from the
 * store. Used before the broker starts and by the registry thread. */
int fm_registry_write_snapshot(const fm_config *cfg, fm_store *st, fm_errbuf *err);

/* Derives a device id from a template prefix and a hardware serial:
 * "<prefix>-<serial lowercased, other chars -> '-'>", at most 64 chars.
 * Returns 0 or FM_EINVAL when the result is not a valid device id. */
int fm_registry_device_id(const char *prefix, const char *serial, char *out, size_t len);

/* Runs a template's pre-provisioning hook: an http(s) URL (POST, JSON) or
 * an absolute path to an executable (JSON on stdin, JSON on stdout), with a
 * timeout of timeout_ms. *response receives the parsed JSON object (caller
 * json_decref's it). Returns 0, FM_ETIMEDOUT, FM_EIO or FM_EPROTO (not a
 * JSON object) with err set. */
int fm_registry_run_hook(const char *hook, struct json_t *request, int timeout_ms,
                         struct json_t **response, fm_errbuf *err);

/* ---- administration shared by the CLI and the HTTP API ---------------- */

/* true when name is 2..63 characters of [a-z0-9-] starting with [a-z0-9]. */
bool fm_template_name_valid(const char *name);
/* Checks a template before it is stored: name, device prefix, lifetime
 * (1..3650 days), rate (0..100000/min) and hook form. 0 or FM_EINVAL with
 * err set to a sentence fit for the user. */
int fm_template_check(const fm_template *t, fm_errbuf *err);
/* Issues a new claim certificate (CN "claim:<name>", a fresh P-256 key)
 * for template name into dir/claim.key (0600) and dir/claim.crt, creating
 * dir (0700), and records its serial (written into serial, >= 64 bytes)
 * so the broker accepts it. Returns 0, FM_ENOTFOUND (no such template),
 * FM_EIO, FM_ECRYPTO, FM_EDB, with err set; on failure no file is left. */
int fm_template_claim_cert(const fm_config *cfg, fm_store *st, const char *name,
                           const char *dir, char *serial, size_t serial_len, fm_errbuf *err);
/* Applies patch (a JSON object, RFC 7386 merge patch) to the desired
 * document of a device's shadow, retrying on concurrent updates, and reads
 * the result into *out (fm_shadow_clear it). Every node then sends the
 * device its delta. Returns 0, FM_ERANGE (document would exceed
 * FM_SHADOW_MAX_BYTES), FM_EBUSY (kept changing), FM_ENOMEM, FM_EDB. */
int fm_shadow_set_desired(fm_store *st, const char *device_id, struct json_t *patch,
                          fm_shadow *out, fm_errbuf *err);

#endif
