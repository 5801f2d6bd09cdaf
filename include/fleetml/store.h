/*
 * Store: the catalogue (tenants, users, devices, certificates) and the
 * records (measurements with their results, quarantined payloads), behind
 * tables of function pointers, one per concern (see struct fm_store), so
 * callers never branch on the backend. Backends: sqlite*.c (embedded
 * default); postgres comes next, one concern at a time.
 *
 * One fm_store handle is used by one thread at a time; threads that need
 * the store concurrently open their own handles (SQLite in WAL mode lets
 * readers run beside the single writer).
 */
#ifndef FLEETML_STORE_H
#define FLEETML_STORE_H

#include "fleetml/config.h"
#include "fleetml/core.h"
#include <stdbool.h>

typedef struct fm_store fm_store;

enum fm_device_status { FM_DEVICE_ACTIVE = 0, FM_DEVICE_DISABLED = 1, FM_DEVICE_REVOKED = 2 };

typedef struct fm_device {
    char id[65];
    char tenant[65];
    int status; /* enum fm_device_status */
    int64_t created_ms;
    char cert_serial[64];    /* first certificate (direct issue); may be "" */
    int64_t cert_not_after_ms; /* its expiry, written by fm_store_device_add (0: unknown) */
    char device_group[65];
    char serial_number[65];  /* hardware serial when provisioned by claim */
    char model[65];
    char firmware[65];
} fm_device;

/* A measurement with its result, as committed in one group commit. The
 * pointers are borrowed for the duration of the call. */
typedef struct fm_record {
    int64_t seq;              /* assigned by the store on commit */
    const char *device_id;
    const char *tenant;
    const char *measurement_id;
    int64_t received_ms;
    int64_t taken_ms;
    const char *payload;      /* validated raw JSON as received */
    size_t payload_len;
    const char *result_json;  /* the reply document sent to the device */
    const char *model;        /* "name@version" */
    const char *shadow_json;  /* a shadow version's result document (never sent
                                 to the device), or NULL */
    int existed;              /* set by the store on commit: (device, id) was
                                 already stored, nothing was written, seq is 0 */
} fm_record;

/* A rejected payload kept for the lake's quarantine area. */
typedef struct fm_quarantine {
    int64_t seq;
    const char *device_id; /* from the topic; may be unknown */
    const char *tenant;    /* "" when the device is unknown */
    int64_t received_ms;
    const char *payload;
    size_t payload_len;
    const char *error_code;
    const char *error_message;
} fm_quarantine;

/* Lake export streams; each has its own cursor. RAW and QUARANTINE rows
 * are fm_record / fm_quarantine; LABELS and AUDIT rows are ready-made JSON
 * documents (fm_doc) written to the lake's labels/ and logs/ areas. */
enum fm_lake_stream {
    FM_STREAM_RAW = 0,
    FM_STREAM_QUARANTINE = 1,
    FM_STREAM_LABELS = 2,
    FM_STREAM_AUDIT = 3
};
#define FM_STREAM_COUNT 4

typedef struct fm_lake_cursor {
    int64_t last_seq;       /* highest seq already in the lake */
    char pending_key[512];  /* object committed to the cursor but maybe not yet put */
    char pending_spool[512];
} fm_lake_cursor;

/* An object the lake export has published: one row of the lake object log,
 * appended in the transaction that settles the export cursor (the
 * lake.object.created event comes from it). */
typedef struct fm_lake_object {
    int64_t seq;        /* the log's position (set by the store) */
    const char *tenant; /* the object's partition */
    const char *area;   /* raw, quarantine, labels or logs */
    const char *key;
    int64_t rows;       /* -1 when not known (an object settled by recovery) */
    int64_t at_ms;      /* when its cursor settled */
} fm_lake_object;
typedef int (*fm_lake_object_cb)(void *ud, const fm_lake_object *o);


/* ---- registry: templates, certificates, provisioning, shadows ---------- */

enum fm_template_status { FM_TEMPLATE_ACTIVE = 0, FM_TEMPLATE_DISABLED = 1 };
enum fm_cert_status { FM_CERT_ACTIVE = 0, FM_CERT_GRACE = 1, FM_CERT_REVOKED = 2 };

/* A provisioning template: which tenant/group a device claimed with it
 * joins, and what is checked before it gets a certificate. */
typedef struct fm_template {
    char name[64];
    char tenant[65];
    char device_group[65];
    char device_prefix[33];
    int cert_days;
    int allow_reprovision;
    int rate_per_min;
    int status;          /* enum fm_template_status */
    int has_allowlist;   /* serials restricted to template_serials */
    char hook[512];      /* "" | http(s)://... | /absolute/executable */
    int64_t created_ms;
} fm_template;

/* What one successful provisioning commits, atomically. */
typedef struct fm_provision {
    const char *template_name;
    const char *serial_number; /* the device's hardware serial */
    const char *device_id;
    const char *tenant;
    const char *device_group;
    const char *model;
    const char *firmware;
    const char *cert_serial;   /* the new certificate */
    const char *cert_pem;
    int64_t not_after_ms;
    int reprovision;           /* revoke the device's earlier certificates */
    const char *key_id;        /* fm_csr_key_id of the certificate's key ("" unknown) */
} fm_provision;

/* A registry change to propagate (to the broker plugin, to devices). */
/* FM_EVENT_PROVISIONED: a device got its certificate by claim (written
 * beside the FM_EVENT_DEVICE of the same change; only rules read it). */
enum fm_event_kind {
    FM_EVENT_DEVICE = 0,
    FM_EVENT_TEMPLATE = 1,
    FM_EVENT_SHADOW = 2,
    FM_EVENT_PROVISIONED = 3
};

typedef struct fm_shadow {
    char *desired;   /* JSON object text (fm_free) */
    char *reported;  /* JSON object text (fm_free) */
    int64_t version; /* 0 when the device has no shadow yet */
    int64_t updated_ms;
} fm_shadow;

typedef int (*fm_template_cb)(void *ud, const fm_template *t);
typedef int (*fm_serial_cb)(void *ud, const char *serial_hex, int status, int64_t when_ms);
typedef int (*fm_event_cb)(void *ud, int64_t seq, int kind, const char *subject);
typedef int (*fm_device_cb)(void *ud, const fm_device *d);

/* ---- users and sessions ------------------------------------------------- */

enum fm_user_status { FM_USER_ACTIVE = 0, FM_USER_DISABLED = 1 };

typedef struct fm_user {
    int64_t id;
    char tenant[65];
    char username[65];      /* normalised: lower case */
    char roles[128];        /* comma-separated, see fleetml/auth.h */
    int status;             /* enum fm_user_status */
    int64_t epoch;          /* revocation epoch: access tokens must carry it */
    int64_t created_ms;
    char password_hash[128]; /* PHC string; "" when the caller does not need it */
    int second_factor;      /* set by fm_auth_login_ex: this sign-in gave a TOTP code */
} fm_user;

typedef int (*fm_user_cb)(void *ud, const fm_user *u);

/* Sign-in throttling parameters (see fm_auth_login in fleetml/auth.h).
 * After `free_failures` failures of one key, each further failure locks it
 * for base_delay_ms doubled per failure, at most max_delay_ms; a key whose
 * last failure is older than forget_after_ms starts over. */
typedef struct fm_throttle_policy {
    int free_failures;       /* 5 */
    int64_t base_delay_ms;   /* 1000 */
    int64_t max_delay_ms;    /* 900000 (15 min) */
    int64_t forget_after_ms; /* 86400000 (24 h) */
} fm_throttle_policy;

#define FM_THROTTLE_POLICY_DEFAULT                                                                 \
    ((fm_throttle_policy){.free_failures = 5, .base_delay_ms = 1000, .max_delay_ms = 900000,      \
                          .forget_after_ms = 86400000})

/* The lock that follows the `failures`-th failure of a key (0 when none). */
static inline int64_t fm_throttle_delay_ms(const fm_throttle_policy *p, int64_t failures)
{
    if (failures <= p->free_failures)
        return 0;
    int64_t d = p->base_delay_ms;
    for (int64_t i = p->free_failures + 1; i < failures && d < p->max_delay_ms; i++)
        d *= 2;
    return d < p->max_delay_ms ? d : p->max_delay_ms;
}

/* SHA-256 of a refresh token: the only form in which the store keeps it. */
#define FM_TOKEN_HASH_LEN 32

/* What a refresh-token rotation learnt about the token it consumed. */
typedef struct fm_refresh_info {
    int64_t user_id;
    char family[32];
} fm_refresh_info;

/* ---- API data: labels, audit, presence, pages ------------------------- */

/* A reference value entered for a measurement (ground truth for retraining).
 * On write the strings are borrowed; on read (fm_store_label_get) they are
 * copied into the fixed buffers and outputs_json is fm_malloc'd. */
typedef struct fm_label {
    int64_t seq;            /* assigned by the store */
    const char *device_id;
    const char *tenant;
    const char *measurement_id;
    const char *outputs_json; /* JSON object {"name": number, ...} */
    const char *source;       /* free text, e.g. "lab:capillary-viscometer" */
    const char *labelled_by;  /* username */
    int64_t at_ms;
} fm_label;

/* One audit entry. Strings are borrowed. details_json may be NULL ("{}"). */
typedef struct fm_audit {
    int64_t seq;
    int64_t at_ms;
    const char *tenant;   /* tenant the action concerns ("" for none) */
    const char *actor;    /* "user:<tenant>/<username>", "anonymous", "cli" */
    const char *action;   /* e.g. "auth.login", "device.revoke", "measurement.read" */
    const char *target;   /* object acted on, e.g. "device:icu-1"; may be "" */
    const char *outcome;  /* "ok", "denied", "failed", "throttled" */
    const char *client;   /* client address, "" when none */
    const char *details_json;
} fm_audit;

/* Filters for fm_store_audit_page; zero / NULL fields do not filter. */
typedef struct fm_audit_filter {
    const char *tenant;   /* NULL: every tenant (operators) */
    const char *actor;
    const char *action;
    int64_t from_ms, to_ms; /* at_ms in [from, to); 0 = open */
    int64_t before_seq;   /* cursor: only seq < before_seq; 0 = from the newest */
} fm_audit_filter;

/* What the device list shows beside a device's catalogue row: online as
 * the broker last reported it, the last time it was seen (connect,
 * disconnect or measurement), and when its certificate ends. */
typedef struct fm_presence {
    int online;
    int64_t changed_ms;   /* last online/offline change (0: never seen) */
    int64_t last_seen_ms; /* max(changed_ms, newest measurement received_ms) */
    int64_t cert_expires_ms; /* latest not-after of its active certificates (0: none) */
    char node[65];        /* the node whose broker reported the state ("" unknown) */
} fm_presence;

/* Devices of one tenant by presence (fm_store_presence_counts). */
typedef struct fm_presence_count {
    const char *tenant;
    int64_t online, offline; /* active devices */
    int64_t inactive;        /* disabled or revoked */
    int64_t on_node;         /* online through the node asked about */
} fm_presence_count;
typedef int (*fm_presence_count_cb)(void *ud, const fm_presence_count *c);

/* One presence change, as fm_store_presence_changes reports it (borrowed
 * strings). rev orders changes by commit across every node. */
typedef struct fm_presence_change {
    int64_t rev;
    const char *device_id;
    const char *tenant;
    int online;
    int64_t changed_ms;
} fm_presence_change;
typedef int (*fm_presence_change_cb)(void *ud, const fm_presence_change *c);

/* Filters and cursor for fm_store_measurement_page: rows of one device with
 * received_ms in [from_ms, to_ms) (0 = open), newest first, ordered by
 * (received_ms DESC, seq DESC); the page starts strictly after the cursor
 * row (cursor_ms, cursor_seq) when cursor_seq > 0. */
typedef struct fm_measurement_query {
    const char *device_id;
    int64_t from_ms, to_ms;
    int64_t cursor_ms, cursor_seq;
    size_t limit;
} fm_measurement_query;

/* One connect/disconnect report (borrowed strings). */
typedef struct fm_presence_update {
    const char *device_id;
    int online;
    int64_t at_ms;
} fm_presence_update;

/* A user's TOTP second factor (see fleetml/auth.h). */
typedef struct fm_totp {
    unsigned char secret[32];
    size_t secret_len;
    int confirmed;     /* 0 while enrolling: not yet required at sign-in */
    int64_t last_step; /* last step whose code was accepted (replay guard) */
} fm_totp;

typedef int (*fm_audit_cb)(void *ud, const fm_audit *a);
typedef int (*fm_label_cb)(void *ud, const fm_label *l);

/* Called for each row of a scan; return nonzero to stop early. */
typedef int (*fm_record_cb)(void *ud, const fm_record *r);
typedef int (*fm_quarantine_cb)(void *ud, const fm_quarantine *q);

/* The store is one handle with an interface per concern, each implemented
 * by one file of a backend, so a backend lands (and a test double is
 * written) one concern at a time:
 *   vt        lifecycle and tenants                 sqlite.c
 *   records   the pipeline's writes: group commit   sqlite.c
 *   lake      the export streams and their cursors  sqlite_lake.c
 *   registry  devices, templates, certificates,     sqlite_registry.c
 *             provisioning, shadows, the event log
 *   users     users, sessions, sign-in throttling,  sqlite_users.c
 *             second factors
 *   api       presence, pages, labels, audit        sqlite_api.c
 *   models    the model registry, deployments,      sqlite_models.c
 *             drift, training jobs
 *   rules     rules, their positions, invocation    sqlite_rules.c
 *             log
 * The lake's document formats live in src/lake/, never in a backend. */
typedef struct fm_store_vtable {
    const char *name;
    int (*migrate)(fm_store *s, fm_errbuf *err);
    void (*close)(fm_store *s);
    int (*tenant_ensure)(fm_store *s, const char *name, fm_errbuf *err);
    int (*tenant_exists)(fm_store *s, const char *name);
    int (*lease)(fm_store *s, const char *name, const char *holder, int64_t ttl_ms,
                 char *owner, size_t owner_len);
    int (*claim_audit)(fm_store *s, const char *name, const char *holder, int64_t ttl_ms,
                       fm_audit *a, fm_errbuf *err);
} fm_store_vtable;

typedef struct fm_store_records_vt {
    int (*result_lookup)(fm_store *s, const char *device_id, const char *measurement_id,
                         char **result_json);
    int (*commit)(fm_store *s, fm_record *recs, size_t n, fm_quarantine *quar, size_t nq,
                  fm_errbuf *err);
    int (*count_measurements)(fm_store *s, const char *device_id, long *out);
    int (*probe_write)(fm_store *s, fm_errbuf *err);
    int (*hot_path)(fm_store *s);
    int (*idle)(fm_store *s);
} fm_store_records_vt;

typedef struct fm_store_lake_vt {
    int (*scan_records)(fm_store *s, int64_t after_seq, size_t limit, fm_record_cb cb,
                        void *ud);
    int (*scan_quarantine)(fm_store *s, int64_t after_seq, size_t limit, fm_quarantine_cb cb,
                           void *ud);
    int (*max_seq)(fm_store *s, enum fm_lake_stream st, int64_t *out);
    int (*lake_cursor_get)(fm_store *s, const char *node, enum fm_lake_stream st,
                           fm_lake_cursor *out);
    int (*lake_cursor_set)(fm_store *s, const char *node, enum fm_lake_stream st,
                           const fm_lake_cursor *c, fm_errbuf *err);
    int (*scan_labels)(fm_store *s, int64_t after_seq, size_t limit, fm_label_cb cb, void *ud);
    int (*scan_audit)(fm_store *s, int64_t after_seq, size_t limit, fm_audit_cb cb, void *ud);
    int (*lake_settle)(fm_store *s, const char *node, enum fm_lake_stream st,
                       const fm_lake_cursor *c, const fm_lake_object *objs, size_t n,
                       fm_errbuf *err);
    int (*lake_objects)(fm_store *s, int64_t after_seq, size_t limit, fm_lake_object_cb cb,
                        void *ud);
    int (*lake_objects_max)(fm_store *s, int64_t *out);
} fm_store_lake_vt;

typedef struct fm_store_registry_vt {
    int (*device_add)(fm_store *s, const fm_device *d, fm_errbuf *err);
    int (*device_get)(fm_store *s, const char *id, fm_device *out);
    int (*device_set_status)(fm_store *s, const char *id, int status, fm_errbuf *err);
    int (*template_add)(fm_store *s, const fm_template *t, const char *const *serials,
                        size_t nserials, fm_errbuf *err);
    int (*template_get)(fm_store *s, const char *name, fm_template *out);
    int (*template_set_status)(fm_store *s, const char *name, int status, fm_errbuf *err);
    int (*template_list)(fm_store *s, fm_template_cb cb, void *ud);
    int (*template_serial_allowed)(fm_store *s, const char *name, const char *serial);
    int (*claim_cert_add)(fm_store *s, const char *tmpl, const char *serial_hex, fm_errbuf *err);
    int (*claim_certs)(fm_store *s, const char *tmpl, fm_serial_cb cb, void *ud);
    int (*cert_add)(fm_store *s, const char *device_id, const char *serial_hex,
                    const char *pem, int64_t not_after_ms, fm_errbuf *err);
    int (*device_certs)(fm_store *s, const char *device_id, fm_serial_cb cb, void *ud);
    int (*device_revoke)(fm_store *s, const char *device_id, fm_errbuf *err);
    int (*device_list)(fm_store *s, fm_device_cb cb, void *ud);
    int (*revoked_certs)(fm_store *s, fm_serial_cb cb, void *ud);
    int (*expire_grace)(fm_store *s, int64_t now_ms, long *expired, fm_errbuf *err);
    int (*provision_lookup)(fm_store *s, const char *serial_number, char *device_id,
                            size_t id_len, char **cert_pem);
    int (*provision_commit)(fm_store *s, const fm_provision *p, fm_errbuf *err);
    int (*rotate_commit)(fm_store *s, const char *device_id, const char *new_serial,
                         const char *pem, const char *key_id, int64_t not_after_ms,
                         const char *old_serial, int64_t grace_until_ms, fm_errbuf *err);
    int (*key_owner)(fm_store *s, const char *key_id, char *device_id, size_t id_len);
    int (*shadow_get)(fm_store *s, const char *device_id, fm_shadow *out);
    int (*shadow_put)(fm_store *s, const char *device_id, const char *desired,
                      const char *reported, int64_t expected_version, int64_t *new_version,
                      int notify, fm_errbuf *err);
    int (*events_after)(fm_store *s, int64_t after_seq, size_t limit, fm_event_cb cb, void *ud);
    int (*events_max)(fm_store *s, int64_t *out);
} fm_store_registry_vt;

typedef struct fm_store_users_vt {
    int (*user_create)(fm_store *s, const char *tenant, const char *username,
                       const char *password_hash, const char *roles, fm_errbuf *err);
    int (*user_count)(fm_store *s, const char *tenant, long *out);
    int (*user_get)(fm_store *s, const char *tenant, const char *username, fm_user *out);
    int (*user_get_by_id)(fm_store *s, int64_t id, fm_user *out);
    int (*user_list)(fm_store *s, const char *tenant, fm_user_cb cb, void *ud);
    int (*user_set_password)(fm_store *s, int64_t id, const char *password_hash, int64_t now_ms,
                             fm_errbuf *err);
    int (*user_set_status)(fm_store *s, int64_t id, int status, int64_t now_ms, fm_errbuf *err);
    int (*user_set_roles)(fm_store *s, int64_t id, const char *roles, fm_errbuf *err);
    int (*user_revoke_sessions)(fm_store *s, int64_t id, int64_t now_ms, fm_errbuf *err);
    int (*throttle_attempt)(fm_store *s, const char *const *keys, size_t n,
                            const fm_throttle_policy *p, int64_t now_ms, int64_t *locks,
                            int64_t *locked_until_ms, fm_errbuf *err);
    int (*throttle_release)(fm_store *s, const char *reset_key, const char *undo_key,
                            int64_t undo_lock_ms, fm_errbuf *err);
    int (*throttle_prune)(fm_store *s, int64_t before_ms, long *pruned);
    int (*session_create)(fm_store *s, const char *family, int64_t user_id, int64_t epoch,
                          const unsigned char *token_hash, int64_t expires_ms, int64_t now_ms,
                          int second_factor, fm_errbuf *err);
    int (*refresh_rotate)(fm_store *s, const unsigned char *old_hash,
                          const unsigned char *new_hash, int64_t new_expires_ms, int64_t now_ms,
                          fm_refresh_info *out, fm_errbuf *err);
    int (*refresh_revoke)(fm_store *s, const unsigned char *token_hash, int64_t now_ms,
                          fm_refresh_info *out, fm_errbuf *err);
    int (*session_active)(fm_store *s, const char *family, int64_t user_id, int *second_factor);
    int (*refresh_prune)(fm_store *s, int64_t before_ms, long *pruned);
    int (*totp_get)(fm_store *s, int64_t user_id, fm_totp *out);
    int (*totp_set)(fm_store *s, int64_t user_id, const unsigned char *secret, size_t len,
                    int64_t now_ms, fm_errbuf *err);
    int (*totp_use)(fm_store *s, int64_t user_id, int64_t step, int confirm, fm_errbuf *err);
    int (*totp_delete)(fm_store *s, int64_t user_id, fm_errbuf *err);
} fm_store_users_vt;

typedef struct fm_store_api_vt {
    int (*device_page)(fm_store *s, const char *tenant, const char *after_id, size_t limit,
                       fm_device_cb cb, void *ud);
    int (*presence_set)(fm_store *s, const char *node, const fm_presence_update *u, size_t n);
    int (*presence_reset)(fm_store *s, const char *node, int64_t at_ms);
    int (*presence_get)(fm_store *s, const char *device_id, fm_presence *out);
    int (*presence_counts)(fm_store *s, const char *node, fm_presence_count_cb cb, void *ud);
    int (*presence_changes)(fm_store *s, int64_t after_rev, size_t limit,
                            fm_presence_change_cb cb, void *ud);
    int (*presence_rev)(fm_store *s, int64_t *rev);
    int (*measurement_page)(fm_store *s, const fm_measurement_query *q, fm_record_cb cb,
                            void *ud);
    int (*measurement_get)(fm_store *s, const char *device_id, const char *measurement_id,
                           fm_record_cb cb, void *ud);
    int (*label_put)(fm_store *s, fm_label *l, fm_errbuf *err);
    int (*label_get)(fm_store *s, const char *device_id, const char *measurement_id,
                     fm_label *out, char *source, size_t source_len, char *by, size_t by_len);
    int (*label_history)(fm_store *s, const char *device_id, const char *measurement_id,
                         fm_label_cb cb, void *ud);
    int (*audit_append)(fm_store *s, fm_audit *a, fm_errbuf *err);
    int (*audit_page)(fm_store *s, const fm_audit_filter *f, size_t limit, fm_audit_cb cb,
                      void *ud);
} fm_store_api_vt;

/* ---- the model registry: a concern of its own (s->models) --------------- */

enum fm_model_status { FM_MODEL_PENDING = 0, FM_MODEL_APPROVED = 1, FM_MODEL_REJECTED = 2 };

/* One registered model version. On write the manifest is borrowed; on read
 * (version_get) manifest_json is fm_malloc'd (free with
 * fm_model_rec_clear). */
typedef struct fm_model_rec {
    char name[65];
    char version[33];
    char owner_tenant[65]; /* the uploader's tenant; "" = the platform (CLI) */
    int status;            /* enum fm_model_status */
    char format[8];        /* "json" or "ubj": the XGBoost model file */
    char sha256[65];       /* of the model file, hex */
    int64_t size;          /* bytes of the model file */
    char created_by[160];
    int64_t created_ms;
    char decided_by[160];  /* who approved or rejected ("" while pending) */
    int64_t decided_ms;
    char note[256];        /* the decision's reason */
    char *manifest_json;
} fm_model_rec;

static inline void fm_model_rec_clear(fm_model_rec *v)
{
    fm_free(v->manifest_json);
    v->manifest_json = NULL;
}

/* A deployment alias: in tenant, alias of model name points at version. */
typedef struct fm_model_alias {
    char tenant[65];
    char name[65];
    char alias[33];
    char version[33];
    int share_pct;       /* canary share of devices in 1..100 (100: everyone) */
    char updated_by[160];
    int64_t updated_ms;
} fm_model_alias;

typedef int (*fm_model_rec_cb)(void *ud, const fm_model_rec *v);
struct fm_drift_counts;

/* A training job (POST /api/v1/training-jobs). */
typedef struct fm_train_job {
    int64_t id;            /* assigned by job_add */
    char tenant[65];
    char node[65];         /* the node running it */
    char status[12];       /* queued, running, done, failed */
    char phase[32];
    int percent;
    char version[33];      /* the version it registers */
    int64_t from_ms, to_ms;
    char requested_by[160];
    char error[256];
    int64_t rows;          /* labelled measurements used */
    int64_t created_ms, updated_ms;
} fm_train_job;
typedef int (*fm_model_alias_cb)(void *ud, const fm_model_alias *a);

typedef struct fm_store_models_vt {
    /* Registers a pending version with its model file (copied). 0,
     * FM_EEXIST (name@version exists), FM_EDB. */
    int (*version_add)(fm_store *s, const fm_model_rec *v, const void *file, size_t len,
                       fm_errbuf *err);
    /* 0 with *out (manifest_json fm_malloc'd), FM_ENOTFOUND, FM_EDB. */
    int (*version_get)(fm_store *s, const char *name, const char *version, fm_model_rec *out);
    /* The model file: 0 with *file (fm_malloc'd) and *len, FM_ENOTFOUND, FM_EDB. */
    int (*version_file)(fm_store *s, const char *name, const char *version, void **file,
                        size_t *len);
    /* Every version of name (NULL: of every model), newest first; the
     * manifest is not read (NULL). cb returning non-zero stops the walk. */
    int (*version_list)(fm_store *s, const char *name, fm_model_rec_cb cb, void *ud);
    /* pending -> approved or rejected, with who, why and when. 0,
     * FM_ENOTFOUND, FM_ESTATE (not pending), FM_EDB. */
    int (*version_decide)(fm_store *s, const char *name, const char *version, int status,
                          const char *by, const char *note, int64_t at_ms, fm_errbuf *err);
    /* Points an alias at an approved version (a->version "" removes the
     * alias), in one transaction with a history row. 0, FM_ENOTFOUND (no
     * such version), FM_ESTATE (not approved), FM_EDB. */
    int (*alias_set)(fm_store *s, const fm_model_alias *a, fm_errbuf *err);
    /* Aliases of tenant (NULL: of every tenant). */
    int (*alias_list)(fm_store *s, const char *tenant, fm_model_alias_cb cb, void *ud);
    /* A number that grows with every alias change (for servers to notice
     * a deployment, on any node). */
    int (*deploy_seq)(fm_store *s, int64_t *out);
    /* The alias history after seq, in seq order (see fm_store_alias_log). */
    int (*alias_log)(fm_store *s, int64_t after_seq, size_t limit,
                     int (*cb)(void *ud, int64_t seq, const fm_model_alias *a), void *ud);
    /* Adds live feature counts (struct fm_drift_counts, fleetml/drift.h)
     * to the stored ones of the same tenant, day and model (several nodes
     * add to one row). 0 or FM_EDB. */
    int (*drift_add)(fm_store *s, const struct fm_drift_counts *c, fm_errbuf *err);
    /* Calls cb for each model's counts of tenant on day. */
    int (*drift_get)(fm_store *s, const char *tenant, int64_t day,
                     int (*cb)(void *ud, const struct fm_drift_counts *c), void *ud);
    /* Training jobs: add (sets j->id), write back status/phase/percent/
     * error/rows, read one, take the oldest queued job of node (marking it
     * running; FM_ENOTFOUND when none), and fail node's running jobs (after
     * a restart). 0, FM_ENOTFOUND or FM_EDB. */
    int (*job_add)(fm_store *s, fm_train_job *j, fm_errbuf *err);
    int (*job_update)(fm_store *s, const fm_train_job *j, fm_errbuf *err);
    int (*job_get)(fm_store *s, int64_t id, fm_train_job *out);
    int (*job_take)(fm_store *s, const char *node, int64_t now_ms, fm_train_job *out);
    int (*job_fail_running)(fm_store *s, const char *node, int64_t now_ms, fm_errbuf *err);
} fm_store_models_vt;

/* ---- rules (fleetml/rules.h) ---------------------------------------------- */

/* A tenant's rule as stored: the checked document and how far the engine
 * got in its event source. Strings are borrowed (for the callback's
 * duration on read). */
typedef struct fm_rule_row {
    const char *tenant;
    const char *name;
    const char *spec_json;  /* the checked rule document (fm_rule_check) */
    int64_t position;       /* last source position handled (seq, rev, ...) */
    const char *updated_by;
    int64_t updated_ms;
} fm_rule_row;
typedef int (*fm_rule_cb)(void *ud, const fm_rule_row *r);

/* One delivery attempt of an event to a rule's target. */
typedef struct fm_rule_log {
    int64_t seq;            /* assigned by the store */
    const char *tenant;
    const char *rule;
    const char *event_id;
    const char *target;     /* "webhook", "function:notify", "dead-letter", ... */
    const char *outcome;    /* "ok", "failed", "dead-lettered", "filtered-error" */
    int attempt;            /* 1 for the first */
    int64_t duration_us;
    const char *error;      /* "" when ok */
    int64_t at_ms;
} fm_rule_log;
typedef int (*fm_rule_log_cb)(void *ud, const fm_rule_log *l);

typedef struct fm_store_rules_vt {
    int (*rule_put)(fm_store *s, const fm_rule_row *r, int *created, fm_errbuf *err);
    int (*rule_list)(fm_store *s, const char *tenant, const char *name, fm_rule_cb cb, void *ud);
    int (*rule_delete)(fm_store *s, const char *tenant, const char *name, fm_errbuf *err);
    int (*rule_position)(fm_store *s, const char *tenant, const char *name, int64_t position,
                         fm_errbuf *err);
    int (*rule_rewind)(fm_store *s, const char *tenant, const char *name, const char *source,
                       int64_t from_ms, int64_t *position, fm_errbuf *err);
    int (*rule_log_add)(fm_store *s, fm_rule_log *l, fm_errbuf *err);
    int (*rule_log_page)(fm_store *s, const char *tenant, const char *rule, int64_t before_seq,
                         size_t limit, fm_rule_log_cb cb, void *ud);
} fm_store_rules_vt;

struct fm_store {
    const fm_store_vtable *vt;
    const fm_store_records_vt *records;
    const fm_store_lake_vt *lake;
    const fm_store_registry_vt *registry;
    const fm_store_users_vt *users;
    const fm_store_api_vt *api;
    const fm_store_models_vt *models;
    const fm_store_rules_vt *rules;
};

/* Calls cb for up to limit alias changes with seq > after_seq, in seq order
 * (every deployment, canary share change or removal, a removal with an
 * empty version); *a is valid during the call. 0 or FM_EDB. */
static inline int fm_store_alias_log(fm_store *s, int64_t after_seq, size_t limit,
                                     int (*cb)(void *ud, int64_t seq, const fm_model_alias *a),
                                     void *ud)
{ return s->models->alias_log(s, after_seq, limit, cb, ud); }

/* Creates or replaces rule (tenant, name): a new rule starts at
 * r->position; a replaced one keeps its position (what it has handled
 * stays handled). *created (may be NULL) says which. 0, FM_ENOTFOUND
 * (unknown tenant), FM_EDB. */
static inline int fm_store_rule_put(fm_store *s, const fm_rule_row *r, int *created,
                                    fm_errbuf *err)
{ return s->rules->rule_put(s, r, created, err); }
/* Calls cb for the rules of tenant (NULL: every tenant's) ordered by
 * (tenant, name); name non-NULL: only that one. 0 or FM_EDB. */
static inline int fm_store_rule_list(fm_store *s, const char *tenant, const char *name,
                                     fm_rule_cb cb, void *ud)
{ return s->rules->rule_list(s, tenant, name, cb, ud); }
/* Deletes a rule and its log. 0, FM_ENOTFOUND, FM_EDB. */
static inline int fm_store_rule_delete(fm_store *s, const char *tenant, const char *name,
                                       fm_errbuf *err)
{ return s->rules->rule_delete(s, tenant, name, err); }
/* Durably records that the rule has handled its source up to position.
 * 0, FM_ENOTFOUND (deleted meanwhile), FM_EDB. */
static inline int fm_store_rule_position(fm_store *s, const char *tenant, const char *name,
                                         int64_t position, fm_errbuf *err)
{ return s->rules->rule_position(s, tenant, name, position, err); }
/* Moves a rule back to just before from_ms in its source ("records":
 * measurements received, "labels": labels written, "presence": presence
 * changes), so the rules engine delivers again everything from then on
 * (it notices by the rule's new updated_ms). *position gets the new
 * position. 0, FM_ENOTFOUND, FM_EINVAL (another source), FM_EDB. */
static inline int fm_store_rule_rewind(fm_store *s, const char *tenant, const char *name,
                                       const char *source, int64_t from_ms, int64_t *position,
                                       fm_errbuf *err)
{ return s->rules->rule_rewind(s, tenant, name, source, from_ms, position, err); }
/* Appends a delivery attempt to the rule's invocation log (l->seq set;
 * at_ms 0 means now). 0 or FM_EDB. */
static inline int fm_store_rule_log_add(fm_store *s, fm_rule_log *l, fm_errbuf *err)
{ return s->rules->rule_log_add(s, l, err); }
/* The rule's log, newest first, entries with seq < before_seq (0: from
 * the newest), at most limit. 0 or FM_EDB. */
static inline int fm_store_rule_log_page(fm_store *s, const char *tenant, const char *rule,
                                         int64_t before_seq, size_t limit, fm_rule_log_cb cb,
                                         void *ud)
{ return s->rules->rule_log_page(s, tenant, rule, before_seq, limit, cb, ud); }

/* Opens the store configured in cfg (creating the database if needed; the
 * schema is migrated to the current version). Returns 0 and *out (close with
 * fm_store_close), or FM_EDB / FM_EIO with err set. */
int fm_store_open(const fm_config *cfg, fm_store **out, fm_errbuf *err);
static inline void fm_store_close(fm_store *s) { if (s) s->vt->close(s); }

/* Creates the tenant if missing (idempotent). Returns 0 or FM_EDB. */
static inline int fm_store_tenant_ensure(fm_store *s, const char *name, fm_errbuf *err)
{ return s->vt->tenant_ensure(s, name, err); }
/* Creates a user; FM_EEXIST if the username exists in that tenant. roles is
 * a comma-separated list. */
static inline int fm_store_user_create(fm_store *s, const char *tenant, const char *username,
                                       const char *password_hash, const char *roles,
                                       fm_errbuf *err)
{ return s->users->user_create(s, tenant, username, password_hash, roles, err); }
static inline int fm_store_user_count(fm_store *s, const char *tenant, long *out)
{ return s->users->user_count(s, tenant, out); }
/* Registers a device; FM_EEXIST if the id is taken, FM_ENOTFOUND if the
 * tenant does not exist. */
static inline int fm_store_device_add(fm_store *s, const fm_device *d, fm_errbuf *err)
{ return s->registry->device_add(s, d, err); }
/* Returns 0 and fills *out, or FM_ENOTFOUND / FM_EDB. */
static inline int fm_store_device_get(fm_store *s, const char *id, fm_device *out)
{ return s->registry->device_get(s, id, out); }
static inline int fm_store_device_set_status(fm_store *s, const char *id, int status,
                                             fm_errbuf *err)
{ return s->registry->device_set_status(s, id, status, err); }
/* Looks up the stored result of (device, measurement id). Returns 0 and
 * *result_json (caller frees with fm_free), FM_ENOTFOUND or FM_EDB. */
static inline int fm_store_result_lookup(fm_store *s, const char *device_id,
                                         const char *measurement_id, char **result_json)
{ return s->records->result_lookup(s, device_id, measurement_id, result_json); }
/* Durably commits records and quarantined payloads in one transaction
 * (synchronous=FULL). Dedupe is by key: a record whose (device, id) is
 * already stored is skipped (insert-or-ignore) and marked existed, the
 * others are written and get their seq. On failure nothing is stored and
 * FM_EDB / FM_ENOSPC / FM_EIO is returned. */
static inline int fm_store_commit(fm_store *s, fm_record *recs, size_t n, fm_quarantine *q,
                                  size_t nq, fm_errbuf *err)
{ return s->records->commit(s, recs, n, q, nq, err); }
/* Commits a tiny durable write, to learn whether the store can take
 * commits again after a failure (disk full, I/O error). Returns 0 or the
 * error a real commit would get. */
static inline int fm_store_probe_write(fm_store *s, fm_errbuf *err)
{ return s->records->probe_write(s, err); }
/* Marks the handle as the latency-critical writer (the pipeline): the
 * backend keeps housekeeping such as WAL checkpoints off it, except as a
 * bound on the log's size (SQLite: a thread of the handle's own copies the
 * WAL into the database; the commit path does only when the log reaches
 * 16 MiB). Returns 0, or FM_EDB / FM_ENOMEM / FM_EINVAL (an in-memory
 * database) when that thread cannot be started. Calling it again does
 * nothing. */
static inline int fm_store_hot_path(fm_store *s) { return s->records->hot_path(s); }
/* Tells the hot-path handle its writer has nothing queued: the moment for
 * the short housekeeping that needs the writer quiet (SQLite: once the WAL
 * holds 2 MiB that the background thread could not retire between two
 * commits, it is copied here, so the log restarts). Bounded (about one
 * fsync); returns 0, or an FM_E* code that leaves the store usable (the
 * caller may ignore it). A no-op on other handles and backends. */
static inline int fm_store_idle(fm_store *s) { return s->records->idle(s); }
static inline int fm_store_count_measurements(fm_store *s, const char *device_id, long *out)
{ return s->records->count_measurements(s, device_id, out); }
/* Calls cb for committed records with seq > after_seq in seq order, at most
 * limit rows. Borrowed pointers are valid only during the callback.
 * Returns 0 or FM_EDB. */
static inline int fm_store_scan_records(fm_store *s, int64_t after_seq, size_t limit,
                                        fm_record_cb cb, void *ud)
{ return s->lake->scan_records(s, after_seq, limit, cb, ud); }
static inline int fm_store_scan_quarantine(fm_store *s, int64_t after_seq, size_t limit,
                                           fm_quarantine_cb cb, void *ud)
{ return s->lake->scan_quarantine(s, after_seq, limit, cb, ud); }
/* Highest seq in a stream (0 when empty). */
static inline int fm_store_max_seq(fm_store *s, enum fm_lake_stream st, int64_t *out)
{ return s->lake->max_seq(s, st, out); }
/* Reads the lake cursor of (node, stream); a missing cursor reads as zeros. */
static inline int fm_store_lake_cursor_get(fm_store *s, const char *node,
                                           enum fm_lake_stream st, fm_lake_cursor *out)
{ return s->lake->lake_cursor_get(s, node, st, out); }
/* Durably writes the lake cursor of (node, stream). */
static inline int fm_store_lake_cursor_set(fm_store *s, const char *node,
                                           enum fm_lake_stream st, const fm_lake_cursor *c,
                                           fm_errbuf *err)
{ return s->lake->lake_cursor_set(s, node, st, c, err); }
/* Durably writes the lake cursor of (node, stream) and appends the n
 * objects it has just published to the lake object log, in one
 * transaction: an object is logged exactly once, when its cursor settles.
 * objs[i].seq and at_ms are set by the store (at_ms: now). 0, or an FM_E*
 * code with err set (then nothing is written). */
static inline int fm_store_lake_settle(fm_store *s, const char *node, enum fm_lake_stream st,
                                       const fm_lake_cursor *c, const fm_lake_object *objs,
                                       size_t n, fm_errbuf *err)
{ return s->lake->lake_settle(s, node, st, c, objs, n, err); }
/* Calls cb for up to limit logged objects after after_seq, in seq (commit)
 * order; the strings live only during the call. 0 or an FM_E* code. */
static inline int fm_store_lake_objects(fm_store *s, int64_t after_seq, size_t limit,
                                        fm_lake_object_cb cb, void *ud)
{ return s->lake->lake_objects(s, after_seq, limit, cb, ud); }
/* The newest seq of the lake object log (0 when empty). */
static inline int fm_store_lake_objects_max(fm_store *s, int64_t *out)
{ return s->lake->lake_objects_max(s, out); }

/* ---- registry wrappers ----------------------------------------------------
 * Every change below that the broker must learn about also appends a
 * registry event in the same transaction (see fm_store_events_after). */

/* Creates a template with an optional serial allow-list (nserials == 0: any
 * serial). FM_EEXIST if the name is taken, FM_ENOTFOUND if the tenant is
 * unknown. */
static inline int fm_store_template_add(fm_store *s, const fm_template *t,
                                        const char *const *serials, size_t nserials,
                                        fm_errbuf *err)
{ return s->registry->template_add(s, t, serials, nserials, err); }
/* 0 and *out, FM_ENOTFOUND, FM_EDB. */
static inline int fm_store_template_get(fm_store *s, const char *name, fm_template *out)
{ return s->registry->template_get(s, name, out); }
static inline int fm_store_template_set_status(fm_store *s, const char *name, int status,
                                               fm_errbuf *err)
{ return s->registry->template_set_status(s, name, status, err); }
static inline int fm_store_template_list(fm_store *s, fm_template_cb cb, void *ud)
{ return s->registry->template_list(s, cb, ud); }
/* 1 when the template allows the serial (no allow-list, or listed), 0 when
 * not, negative FM_E* on error. */
static inline int fm_store_template_serial_allowed(fm_store *s, const char *name,
                                                   const char *serial)
{ return s->registry->template_serial_allowed(s, name, serial); }
/* Records a claim certificate serial for a template (it becomes usable). */
static inline int fm_store_claim_cert_add(fm_store *s, const char *tmpl, const char *serial_hex,
                                          fm_errbuf *err)
{ return s->registry->claim_cert_add(s, tmpl, serial_hex, err); }
/* Calls cb for each claim certificate serial of a template. */
static inline int fm_store_claim_certs(fm_store *s, const char *tmpl, fm_serial_cb cb, void *ud)
{ return s->registry->claim_certs(s, tmpl, cb, ud); }
/* Records an active certificate of a device (direct issue). */
static inline int fm_store_cert_add(fm_store *s, const char *device_id, const char *serial_hex,
                                    const char *pem, int64_t not_after_ms, fm_errbuf *err)
{ return s->registry->cert_add(s, device_id, serial_hex, pem, not_after_ms, err); }
/* Calls cb for each certificate of the device that may connect (active or
 * in its rotation grace period); when is the grace end (0 if active). */
static inline int fm_store_device_certs(fm_store *s, const char *device_id, fm_serial_cb cb,
                                        void *ud)
{ return s->registry->device_certs(s, device_id, cb, ud); }
/* Irreversibly revokes a device and all its certificates. FM_ENOTFOUND. */
static inline int fm_store_device_revoke(fm_store *s, const char *device_id, fm_errbuf *err)
{ return s->registry->device_revoke(s, device_id, err); }
static inline int fm_store_device_list(fm_store *s, fm_device_cb cb, void *ud)
{ return s->registry->device_list(s, cb, ud); }
/* Calls cb for every revoked certificate (for the CRL); when = revocation. */
static inline int fm_store_revoked_certs(fm_store *s, fm_serial_cb cb, void *ud)
{ return s->registry->revoked_certs(s, cb, ud); }
/* Revokes certificates whose rotation grace ended before now_ms. */
static inline int fm_store_expire_grace(fm_store *s, int64_t now_ms, long *expired,
                                        fm_errbuf *err)
{ return s->registry->expire_grace(s, now_ms, expired, err); }
/* Finds the device provisioned for a hardware serial: 0 with device_id and
 * its newest active certificate PEM (*cert_pem, fm_free; may be NULL when
 * none is active), FM_ENOTFOUND, FM_EDB. */
static inline int fm_store_provision_lookup(fm_store *s, const char *serial_number,
                                            char *device_id, size_t id_len, char **cert_pem)
{ return s->registry->provision_lookup(s, serial_number, device_id, id_len, cert_pem); }
/* Registers (or re-activates, when p->reprovision) the device, revokes its
 * older certificates if reprovisioning, records the new active certificate
 * and the serial -> device mapping, in one transaction. FM_EEXIST when the
 * device id belongs to another serial. */
static inline int fm_store_provision_commit(fm_store *s, const fm_provision *p, fm_errbuf *err)
{ return s->registry->provision_commit(s, p, err); }
/* Adds a new active certificate (its key identity key_id, "" unknown) and
 * puts old_serial into its grace period (until grace_until_ms), in one
 * transaction. */
static inline int fm_store_rotate_commit(fm_store *s, const char *device_id,
                                         const char *new_serial, const char *pem,
                                         const char *key_id, int64_t not_after_ms,
                                         const char *old_serial, int64_t grace_until_ms,
                                         fm_errbuf *err)
{ return s->registry->rotate_commit(s, device_id, new_serial, pem, key_id, not_after_ms, old_serial,
                             grace_until_ms, err); }
/* Which device holds a certificate (active or in its rotation grace) for
 * the key identity key_id (fm_csr_key_id): 0 with its id copied into
 * device_id, FM_ENOTFOUND, or FM_EDB. Revoked certificates do not count. */
static inline int fm_store_key_owner(fm_store *s, const char *key_id, char *device_id,
                                     size_t id_len)
{ return s->registry->key_owner(s, key_id, device_id, id_len); }
/* Reads a device's shadow; a missing shadow reads as version 0 with "{}"
 * documents. Free the strings with fm_free. */
static inline int fm_store_shadow_get(fm_store *s, const char *device_id, fm_shadow *out)
{ return s->registry->shadow_get(s, device_id, out); }
/* Writes both documents and bumps the version. expected_version >= 0 makes
 * it conditional (FM_EBUSY when the stored version differs). notify adds a
 * shadow event (so every node pushes the delta). */
static inline int fm_store_shadow_put(fm_store *s, const char *device_id, const char *desired,
                                      const char *reported, int64_t expected_version,
                                      int64_t *new_version, int notify, fm_errbuf *err)
{ return s->registry->shadow_put(s, device_id, desired, reported, expected_version, new_version,
                          notify, err); }
/* Calls cb for registry events with seq > after_seq, in order. */
static inline int fm_store_events_after(fm_store *s, int64_t after_seq, size_t limit,
                                        fm_event_cb cb, void *ud)
{ return s->registry->events_after(s, after_seq, limit, cb, ud); }
static inline int fm_store_events_max(fm_store *s, int64_t *out)
{ return s->registry->events_max(s, out); }
/* Frees the strings of a shadow read with fm_store_shadow_get. */
static inline void fm_shadow_clear(fm_shadow *sh)
{ fm_free(sh->desired); fm_free(sh->reported); sh->desired = sh->reported = NULL; }

/* ---- users and sessions wrappers --------------------------------------------
 * Policy (password rules, hashing, role names) lives in fleetml/auth.h;
 * these only store. Every change that must end a user's sessions (password,
 * disable, "log out everywhere") bumps the user's epoch and revokes all its
 * refresh-token families in the same transaction. */

/* Reads a user by (tenant, username) or by id. 0 and *out, FM_ENOTFOUND,
 * FM_EDB. */
static inline int fm_store_user_get(fm_store *s, const char *tenant, const char *username,
                                    fm_user *out)
{ return s->users->user_get(s, tenant, username, out); }
static inline int fm_store_user_get_by_id(fm_store *s, int64_t id, fm_user *out)
{ return s->users->user_get_by_id(s, id, out); }
/* Calls cb for each user of tenant (every tenant when tenant is NULL), by
 * tenant then username; password_hash is left empty. 0 or FM_EDB. */
static inline int fm_store_user_list(fm_store *s, const char *tenant, fm_user_cb cb, void *ud)
{ return s->users->user_list(s, tenant, cb, ud); }
/* Stores a new password hash, bumps the epoch, revokes all families.
 * 0, FM_ENOTFOUND, FM_EDB. */
static inline int fm_store_user_set_password(fm_store *s, int64_t id, const char *password_hash,
                                             int64_t now_ms, fm_errbuf *err)
{ return s->users->user_set_password(s, id, password_hash, now_ms, err); }
/* Sets the status; FM_USER_DISABLED also bumps the epoch and revokes all
 * families. 0, FM_ENOTFOUND, FM_EDB. */
static inline int fm_store_user_set_status(fm_store *s, int64_t id, int status, int64_t now_ms,
                                           fm_errbuf *err)
{ return s->users->user_set_status(s, id, status, now_ms, err); }
/* Replaces the roles and bumps the epoch (families stay). */
static inline int fm_store_user_set_roles(fm_store *s, int64_t id, const char *roles,
                                          fm_errbuf *err)
{ return s->users->user_set_roles(s, id, roles, err); }
/* Bumps the epoch and revokes every family of the user. */
static inline int fm_store_user_revoke_sessions(fm_store *s, int64_t id, int64_t now_ms,
                                                fm_errbuf *err)
{ return s->users->user_revoke_sessions(s, id, now_ms, err); }
/* Counts one sign-in attempt against each of keys[0..n-1] (n <= 4), key i
 * under policy p[i] (p is an array of n policies), atomically:
 * when any key is locked at now_ms nothing is counted, *locked_until_ms is
 * the latest lock end and FM_EBUSY is returned. Otherwise each key's
 * failure count grows by one, locks[i] (array of n, may be NULL) receives
 * the lock this put on keys[i] (0 for none), *locked_until_ms the latest of
 * them, and 0 is returned. FM_EDB on failure. */
static inline int fm_store_throttle_attempt(fm_store *s, const char *const *keys, size_t n,
                                            const fm_throttle_policy *p, int64_t now_ms,
                                            int64_t *locks, int64_t *locked_until_ms,
                                            fm_errbuf *err)
{ return s->users->throttle_attempt(s, keys, n, p, now_ms, locks, locked_until_ms, err); }
/* After a successful sign-in: forgets reset_key entirely, and takes back the
 * attempt counted against undo_key (one failure less; its lock is lifted
 * only if it is still undo_lock_ms, the one that attempt set). Either key
 * may be NULL. */
static inline int fm_store_throttle_release(fm_store *s, const char *reset_key,
                                            const char *undo_key, int64_t undo_lock_ms,
                                            fm_errbuf *err)
{ return s->users->throttle_release(s, reset_key, undo_key, undo_lock_ms, err); }
/* Deletes throttle entries whose last failure is older than before_ms. */
static inline int fm_store_throttle_prune(fm_store *s, int64_t before_ms, long *pruned)
{ return s->users->throttle_prune(s, before_ms, pruned); }
/* Creates a refresh-token family for user_id with its first token (hash of
 * FM_TOKEN_HASH_LEN bytes), remembering whether the sign-in gave a second
 * factor (second_factor 1; every token of the session inherits it),
 * provided the user is still active and still at
 * `epoch` (the one seen when the password was checked: a password change or
 * disable in between must win). 0, FM_ENOTFOUND (no such user), FM_ESTATE
 * (disabled, or epoch moved on), FM_EEXIST, FM_EDB. */
static inline int fm_store_session_create(fm_store *s, const char *family, int64_t user_id,
                                          int64_t epoch, const unsigned char *token_hash,
                                          int64_t expires_ms, int64_t now_ms, int second_factor,
                                          fm_errbuf *err)
{ return s->users->session_create(s, family, user_id, epoch, token_hash, expires_ms, now_ms,
                              second_factor, err); }
/* Consumes the refresh token old_hash and adds new_hash to its family, in
 * one transaction. The new token expires at new_expires_ms or when the old
 * one would have, whichever is first, so a session never outlives its
 * first token. Returns 0 and *out; FM_ENOTFOUND (unknown token);
 * FM_EPERM (family revoked, or token expired); FM_ESTATE when the token was
 * already used: the family is then revoked (committed) before returning. */
static inline int fm_store_refresh_rotate(fm_store *s, const unsigned char *old_hash,
                                          const unsigned char *new_hash, int64_t new_expires_ms,
                                          int64_t now_ms, fm_refresh_info *out, fm_errbuf *err)
{ return s->users->refresh_rotate(s, old_hash, new_hash, new_expires_ms, now_ms, out, err); }
/* Revokes the family the token belongs to; *out (may be NULL) says whose
 * it was. 0, FM_ENOTFOUND, FM_EDB. */
static inline int fm_store_refresh_revoke(fm_store *s, const unsigned char *token_hash,
                                          int64_t now_ms, fm_refresh_info *out, fm_errbuf *err)
{ return s->users->refresh_revoke(s, token_hash, now_ms, out, err); }
/* 0 when family exists, belongs to user_id and is not revoked (then
 * *second_factor, if non-NULL, says whether its sign-in gave a second
 * factor); FM_EPERM otherwise; FM_EDB. */
static inline int fm_store_session_active(fm_store *s, const char *family, int64_t user_id,
                                          int *second_factor)
{ return s->users->session_active(s, family, user_id, second_factor); }
/* Deletes refresh tokens that expired before before_ms, and families left
 * without tokens. */
static inline int fm_store_refresh_prune(fm_store *s, int64_t before_ms, long *pruned)
{ return s->users->refresh_prune(s, before_ms, pruned); }
/* 1 when the tenant exists, 0 when not, FM_EDB. */
static inline int fm_store_tenant_exists(fm_store *s, const char *name)
{ return s->vt->tenant_exists(s, name); }

/* Cluster leases: a cluster-wide job (the lake export) runs only on the
 * node holding its lease. Takes the lease `name` for `holder` (a node id)
 * for ttl_ms from now, by the database's clock, when it is free, expired
 * or already the holder's (a renewal); ttl_ms == 0 releases it if the
 * holder has it. Returns 0 when holder now holds it (or released it),
 * FM_EBUSY when another node does, and only then (its id copied into owner
 * when owner is not NULL), FM_EINVAL on empty names, FM_EDB / FM_EUNAVAIL
 * (a busy or unreachable database). The holder
 * must renew well before ttl_ms passes and stop the job when a renewal
 * fails: a lease it cannot renew may already be someone else's. */
static inline int fm_store_lease(fm_store *s, const char *name, const char *holder,
                                 int64_t ttl_ms, char *owner, size_t owner_len)
{ return s->vt->lease(s, name, holder, ttl_ms, owner, owner_len); }
/* A claim: an action done once per cluster (a drift alert of a day).
 * Takes the lease `name` for holder for ttl_ms only when no unexpired
 * lease of that name exists -- held by anyone, holder included, so a node
 * restarted the same day does not claim again -- and appends the audit
 * entry a (at_ms set; seq set on success) in the same transaction, so the
 * action is recorded exactly when it is claimed. 0 when claimed and
 * recorded, FM_EBUSY when already claimed (nothing written) and only
 * then, FM_EINVAL on empty names or ttl_ms <= 0, or another FM_E* code
 * with err set (nothing written; a database too busy to answer is
 * FM_EUNAVAIL, never FM_EBUSY, so a caller can tell "try again" from
 * "someone has it"). */
static inline int fm_store_claim_audit(fm_store *s, const char *name, const char *holder,
                                       int64_t ttl_ms, fm_audit *a, fm_errbuf *err)
{ return s->vt->claim_audit(s, name, holder, ttl_ms, a, err); }

/* ---- API data wrappers ------------------------------------------------------ */

/* Calls cb for up to limit devices of tenant (every tenant when NULL) with
 * id > after_id (after_id NULL or "": from the start), ordered by id.
 * 0 or FM_EDB. */
static inline int fm_store_device_page(fm_store *s, const char *tenant, const char *after_id,
                                       size_t limit, fm_device_cb cb, void *ud)
{ return s->api->device_page(s, tenant, after_id, limit, cb, ud); }
/* Records n connect (online 1) / disconnect (0) reports in one transaction
 * (a connect storm after a broker restart is thousands of them). A report
 * older than what is stored for its device is ignored (reports may arrive
 * twice or out of order when several nodes listen), as are unknown devices.
 * Each stored state names the node whose broker reported it (`node`, a node
 * id), which scopes fm_store_presence_reset. Not a registry event: presence is not pushed to the broker. 0 or FM_EDB /
 * FM_EBUSY / FM_EIO / FM_ENOSPC (nothing stored). */
static inline int fm_store_presence_set(fm_store *s, const char *node,
                                        const fm_presence_update *u, size_t n)
{ return s->api->presence_set(s, node, u, n); }
/* Node `node`'s broker lost every session at at_ms (it restarted): marks
 * offline, as of at_ms, every device that node last reported online by a
 * report older than at_ms. Reports stamped at or after at_ms (reconnects
 * to the new broker) and devices another node reported since stay (states
 * stored before nodes were recorded belong to every node). 0 or FM_EDB. */
static inline int fm_store_presence_reset(fm_store *s, const char *node, int64_t at_ms)
{ return s->api->presence_reset(s, node, at_ms); }
/* Fills *out (zeros for a device never seen). 0 or FM_EDB. */
static inline int fm_store_presence_get(fm_store *s, const char *device_id, fm_presence *out)
{ return s->api->presence_get(s, device_id, out); }
/* Calls cb once per tenant with devices, in tenant order: its active
 * devices online and offline, the others, and those online through node
 * (its broker reported them). One query, whatever the fleet's size. 0 or
 * an FM_E* code. */
static inline int fm_store_presence_counts(fm_store *s, const char *node,
                                           fm_presence_count_cb cb, void *ud)
{ return s->api->presence_counts(s, node, cb, ud); }
/* Calls cb for up to limit presence changes with rev > after_rev, in rev
 * order: every stored change (fm_store_presence_set, and each device
 * fm_store_presence_reset takes offline) is logged with a rev larger than
 * every rev already visible, on every node, so a reader that passes the
 * last rev it saw misses nothing, however short a connection was. A
 * report older than the stored state is not a change. Borrowed strings
 * live during the callback only; cb returns nonzero to stop. 0 or
 * FM_EDB. */
static inline int fm_store_presence_changes(fm_store *s, int64_t after_rev, size_t limit,
                                            fm_presence_change_cb cb, void *ud)
{ return s->api->presence_changes(s, after_rev, limit, cb, ud); }
/* *rev = the newest presence rev (0 when none): where a reader that wants
 * only changes from now on starts. 0 or FM_EDB. */
static inline int fm_store_presence_rev(fm_store *s, int64_t *rev)
{ return s->api->presence_rev(s, rev); }
/* Calls cb for up to q->limit measurements of q->device_id (see
 * fm_measurement_query), with payload, result and model. Borrowed pointers
 * live during the callback only. To continue, pass the last row's
 * (received_ms, seq) as the cursor: pages neither repeat nor skip rows,
 * even when several share a received_ms. 0, FM_EINVAL (no device_id) or
 * FM_EDB. */
static inline int fm_store_measurement_page(fm_store *s, const fm_measurement_query *q,
                                            fm_record_cb cb, void *ud)
{ return s->api->measurement_page(s, q, cb, ud); }
/* Calls cb once with the measurement (device, id). 0, FM_ENOTFOUND, FM_EDB. */
static inline int fm_store_measurement_get(fm_store *s, const char *device_id,
                                           const char *measurement_id, fm_record_cb cb,
                                           void *ud)
{ return s->api->measurement_get(s, device_id, measurement_id, cb, ud); }
/* Stores the label of a measurement (replacing an earlier one), in one
 * transaction with the check that the measurement exists. l->tenant may
 * be NULL or "" (any tenant); otherwise the measurement must belong to it.
 * The stored tenant is the measurement's. l->at_ms 0 means now (l->at_ms
 * is then set). Every write is appended to the label log with a new,
 * larger seq (l->seq), which the lake exporter writes to labels/, so the
 * lake keeps every version; the current label is what fm_store_label_get
 * reads. Returns 0,
 * FM_EINVAL (outputs_json not a JSON object, no device or measurement id),
 * FM_ENOTFOUND (no such measurement of that device and tenant), FM_EDB /
 * FM_ENOSPC / FM_EIO. */
static inline int fm_store_label_put(fm_store *s, fm_label *l, fm_errbuf *err)
{ return s->api->label_put(s, l, err); }
/* Reads the current label: *out's device_id/tenant/measurement_id are NULL,
 * outputs_json is fm_malloc'd (caller frees with fm_free((void *)...)),
 * source and labelled_by point into the caller's buffers (truncated to
 * fit; left NULL when a buffer is NULL). 0, FM_ENOTFOUND, FM_ENOMEM,
 * FM_EDB. */
static inline int fm_store_label_get(fm_store *s, const char *device_id,
                                     const char *measurement_id, fm_label *out, char *source,
                                     size_t source_len, char *by, size_t by_len)
{ return s->api->label_get(s, device_id, measurement_id, out, source, source_len, by, by_len); }
/* Calls cb for every label ever written for the measurement (the label
 * log: the current one and the corrections before it), oldest first.
 * device_id, tenant and measurement_id of *l are set; strings are borrowed
 * for the call. cb returns nonzero to stop. 0 (also when there is none)
 * or FM_EDB. */
static inline int fm_store_label_history(fm_store *s, const char *device_id,
                                         const char *measurement_id, fm_label_cb cb, void *ud)
{ return s->api->label_history(s, device_id, measurement_id, cb, ud); }
/* Durably appends an audit entry (a->seq set; a->at_ms 0 means now and is
 * then set; NULL strings are stored as ""). 0, FM_EINVAL (details_json not
 * a JSON object), FM_EDB, FM_ENOSPC, FM_EIO. */
static inline int fm_store_audit_append(fm_store *s, fm_audit *a, fm_errbuf *err)
{ return s->api->audit_append(s, a, err); }
/* Calls cb for up to limit matching entries, newest first (seq DESC); f
 * may be NULL (no filter). Pass the last entry's seq as before_seq for the
 * next page. Borrowed pointers live during the callback only. 0, FM_EDB. */
static inline int fm_store_audit_page(fm_store *s, const fm_audit_filter *f, size_t limit,
                                      fm_audit_cb cb, void *ud)
{ return s->api->audit_page(s, f, limit, cb, ud); }
/* The LABELS and AUDIT streams, for the lake exporter (which renders the
 * documents, src/lake/writer.c): cb gets each row with seq > after_seq in
 * seq order, at most limit rows, strings borrowed for the call (a label's
 * outputs_json and an entry's details_json are the stored JSON object
 * text); cb returns nonzero to stop. 0 or FM_EDB. */
static inline int fm_store_scan_labels(fm_store *s, int64_t after_seq, size_t limit,
                                       fm_label_cb cb, void *ud)
{ return s->lake->scan_labels(s, after_seq, limit, cb, ud); }
static inline int fm_store_scan_audit(fm_store *s, int64_t after_seq, size_t limit,
                                      fm_audit_cb cb, void *ud)
{ return s->lake->scan_audit(s, after_seq, limit, cb, ud); }

/* ---- second factor ---------------------------------------------------------- */

/* Reads a user's TOTP state. 0, FM_ENOTFOUND (none), FM_EDB. */
static inline int fm_store_totp_get(fm_store *s, int64_t user_id, fm_totp *out)
{ return s->users->totp_get(s, user_id, out); }
/* Starts an enrolment: stores secret (<= 32 bytes) unconfirmed, replacing
 * an unconfirmed one. FM_EEXIST when a confirmed one exists (delete it
 * first), FM_ENOTFOUND (no such user), FM_EDB. */
static inline int fm_store_totp_set(fm_store *s, int64_t user_id, const unsigned char *secret,
                                    size_t len, int64_t now_ms, fm_errbuf *err)
{ return s->users->totp_set(s, user_id, secret, len, now_ms, err); }
/* Uses up step (a code just verified): atomically, only if step is after
 * the last one used, and (confirm 0) only for a confirmed secret or
 * (confirm 1) also confirming an enrolment. 0, FM_ESTATE (replayed step,
 * or nothing to use/confirm), FM_EDB. */
static inline int fm_store_totp_use(fm_store *s, int64_t user_id, int64_t step, int confirm,
                                    fm_errbuf *err)
{ return s->users->totp_use(s, user_id, step, confirm, err); }
/* Removes a user's TOTP (disable, or an admin's reset). 0 (also when there
 * was none), FM_EDB. */
static inline int fm_store_totp_delete(fm_store *s, int64_t user_id, fm_errbuf *err)
{ return s->users->totp_delete(s, user_id, err); }

#endif
