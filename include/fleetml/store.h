/*
 * Store: the catalogue (tenants, users, devices, certificates) and the
 * records (measurements with their results, quarantined payloads), behind
 * one table of function pointers so callers never branch on the backend.
 * Backends: sqlite.c (embedded default); postgres.c comes later.
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
    char cert_serial[48];
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

/* Lake export streams; each has its own cursor. */
enum fm_lake_stream { FM_STREAM_RAW = 0, FM_STREAM_QUARANTINE = 1 };

typedef struct fm_lake_cursor {
    int64_t last_seq;       /* highest seq already in the lake */
    char pending_key[512];  /* object committed to the cursor but maybe not yet put */
    char pending_spool[512];
} fm_lake_cursor;

/* Called for each row of a scan; return nonzero to stop early. */
typedef int (*fm_record_cb)(void *ud, const fm_record *r);
typedef int (*fm_quarantine_cb)(void *ud, const fm_quarantine *q);

typedef struct fm_store_vtable {
    const char *name;
    int (*migrate)(fm_store *s, fm_errbuf *err);
    void (*close)(fm_store *s);

    int (*tenant_ensure)(fm_store *s, const char *name, fm_errbuf *err);
    int (*user_create)(fm_store *s, const char *tenant, const char *username,
                       const char *password_hash, const char *roles, fm_errbuf *err);
    int (*user_count)(fm_store *s, const char *tenant, long *out);

    int (*device_add)(fm_store *s, const fm_device *d, fm_errbuf *err);
    int (*device_get)(fm_store *s, const char *id, fm_device *out);
    int (*device_set_status)(fm_store *s, const char *id, int status, fm_errbuf *err);

    int (*result_lookup)(fm_store *s, const char *device_id, const char *measurement_id,
                         char **result_json);
    int (*commit)(fm_store *s, fm_record *recs, size_t n, fm_quarantine *quar, size_t nq,
                  fm_errbuf *err);
    int (*count_measurements)(fm_store *s, const char *device_id, long *out);
    int (*probe_write)(fm_store *s, fm_errbuf *err);

    int (*scan_records)(fm_store *s, int64_t after_seq, size_t limit, fm_record_cb cb,
                        void *ud);
    int (*scan_quarantine)(fm_store *s, int64_t after_seq, size_t limit, fm_quarantine_cb cb,
                           void *ud);
    int (*max_seq)(fm_store *s, enum fm_lake_stream st, int64_t *out);
    int (*lake_cursor_get)(fm_store *s, const char *node, enum fm_lake_stream st,
                           fm_lake_cursor *out);
    int (*lake_cursor_set)(fm_store *s, const char *node, enum fm_lake_stream st,
                           const fm_lake_cursor *c, fm_errbuf *err);
} fm_store_vtable;

struct fm_store {
    const fm_store_vtable *vt;
};

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
{ return s->vt->user_create(s, tenant, username, password_hash, roles, err); }
static inline int fm_store_user_count(fm_store *s, const char *tenant, long *out)
{ return s->vt->user_count(s, tenant, out); }
/* Registers a device; FM_EEXIST if the id is taken, FM_ENOTFOUND if the
 * tenant does not exist. */
static inline int fm_store_device_add(fm_store *s, const fm_device *d, fm_errbuf *err)
{ return s->vt->device_add(s, d, err); }
/* Returns 0 and fills *out, or FM_ENOTFOUND / FM_EDB. */
static inline int fm_store_device_get(fm_store *s, const char *id, fm_device *out)
{ return s->vt->device_get(s, id, out); }
static inline int fm_store_device_set_status(fm_store *s, const char *id, int status,
                                             fm_errbuf *err)
{ return s->vt->device_set_status(s, id, status, err); }
/* Looks up the stored result of (device, measurement id). Returns 0 and
 * *result_json (caller frees with fm_free), FM_ENOTFOUND or FM_EDB. */
static inline int fm_store_result_lookup(fm_store *s, const char *device_id,
                                         const char *measurement_id, char **result_json)
{ return s->vt->result_lookup(s, device_id, measurement_id, result_json); }
/* Durably commits records and quarantined payloads in one transaction
 * (synchronous=FULL). On success each recs[i].seq is set. On failure nothing
 * is stored and FM_EDB / FM_ENOSPC / FM_EIO is returned; a record whose
 * (device, id) already exists makes the whole call fail with FM_EEXIST, so
 * callers dedupe first. */
static inline int fm_store_commit(fm_store *s, fm_record *recs, size_t n, fm_quarantine *q,
                                  size_t nq, fm_errbuf *err)
{ return s->vt->commit(s, recs, n, q, nq, err); }
/* Commits a tiny durable write, to learn whether the store can take
 * commits again after a failure (disk full, I/O error). Returns 0 or the
 * error a real commit would get. */
static inline int fm_store_probe_write(fm_store *s, fm_errbuf *err)
{ return s->vt->probe_write(s, err); }
static inline int fm_store_count_measurements(fm_store *s, const char *device_id, long *out)
{ return s->vt->count_measurements(s, device_id, out); }
/* Calls cb for committed records with seq > after_seq in seq order, at most
 * limit rows. Borrowed pointers are valid only during the callback.
 * Returns 0 or FM_EDB. */
static inline int fm_store_scan_records(fm_store *s, int64_t after_seq, size_t limit,
                                        fm_record_cb cb, void *ud)
{ return s->vt->scan_records(s, after_seq, limit, cb, ud); }
static inline int fm_store_scan_quarantine(fm_store *s, int64_t after_seq, size_t limit,
                                           fm_quarantine_cb cb, void *ud)
{ return s->vt->scan_quarantine(s, after_seq, limit, cb, ud); }
/* Highest seq in a stream (0 when empty). */
static inline int fm_store_max_seq(fm_store *s, enum fm_lake_stream st, int64_t *out)
{ return s->vt->max_seq(s, st, out); }
/* Reads the lake cursor of (node, stream); a missing cursor reads as zeros. */
static inline int fm_store_lake_cursor_get(fm_store *s, const char *node,
                                           enum fm_lake_stream st, fm_lake_cursor *out)
{ return s->vt->lake_cursor_get(s, node, st, out); }
/* Durably writes the lake cursor of (node, stream). */
static inline int fm_store_lake_cursor_set(fm_store *s, const char *node,
                                           enum fm_lake_stream st, const fm_lake_cursor *c,
                                           fm_errbuf *err)
{ return s->vt->lake_cursor_set(s, node, st, c, err); }

#endif
