/* Internals shared by the SQLite backend's files. */
#ifndef FLEETML_SQLITE_INT_H
#define FLEETML_SQLITE_INT_H

#include "store/store_internal.h"

#include "fleetml/thread.h"

#include <sqlite3.h>

typedef struct sql__ckpt sql__ckpt;

typedef struct sqlite_store {
    fm_store base;
    sqlite3 *db;
    sqlite3_stmt *ins_meas, *ins_quar, *lookup, *dev_get, *begin, *commit, *rollback;
    sql__ckpt *ckpt; /* the hot-path handle's checkpointer, or NULL */
} sqlite_store;

/* The hot-path handle's WAL checkpointer (sqlite_ckpt.c): a thread with its
 * own connection that keeps checkpoints off the committing thread.
 * sql__ckpt_start returns 0, FM_EDB (cannot open the second connection),
 * FM_EINVAL (no file name: an in-memory database) or FM_ENOMEM, with
 * nothing started. sql__ckpt_stop joins the thread and closes its
 * connection; no-op when none was started. */
int sql__ckpt_start(sqlite_store *s);
void sql__ckpt_stop(sqlite_store *s);
/* fm_store_idle on SQLite: 0 or the checkpoint's mapped error. */
int sql__ckpt_idle(sqlite_store *s);

/* The interfaces per concern, one file each (see store.h). */
extern const fm_store_lake_vt sql__lake_vt;         /* sqlite_lake.c */
extern const fm_store_registry_vt sql__registry_vt; /* sqlite_registry.c */
extern const fm_store_users_vt sql__users_vt;       /* sqlite_users.c */
extern const fm_store_api_vt sql__api_vt;           /* sqlite_api.c */
extern const fm_store_models_vt sql__models_vt;     /* sqlite_models.c */
extern const fm_store_rules_vt sql__rules_vt;       /* sqlite_rules.c */

/* Maps an SQLite result code to an FM_E* code (0 for OK/DONE/ROW). */
int sql__map_rc(int rc);
/* Fills err with "what: <sqlite message>" and returns the mapped code. */
int sql__err(sqlite_store *s, fm_errbuf *err, int rc, const char *what);
/* Runs SQL text (several statements allowed). */
int sql__exec(sqlite_store *s, const char *sql, fm_errbuf *err);
/* Prepares a statement (persistent). */
int sql__prep(sqlite_store *s, sqlite3_stmt **st, const char *sql, fm_errbuf *err);
/* Steps a statement to completion, resets it; returns SQLITE_OK or the
 * failing code. */
int sql__step_done(sqlite3_stmt *st);
/* Copies a text column into dst (empty string for NULL). */
void sql__copy_col(char *dst, size_t n, sqlite3_stmt *st, int col);
/* BEGIN IMMEDIATE / COMMIT / ROLLBACK with the store's prepared statements. */
int sql__begin(sqlite_store *s, fm_errbuf *err);
int sql__commit(sqlite_store *s, fm_errbuf *err);
void sql__rollback(sqlite_store *s);
/* 1 when the tenant exists, 0 when not, negative FM_E* on error. */
int sql__tenant_exists(fm_store *s, const char *name);
/* 0 when the tenant exists, FM_ENOTFOUND ("tenant '...' does not exist")
 * or the lookup's error, with err set. */
int sql__require_tenant(sqlite_store *s, const char *tenant, fm_errbuf *err);
/* Runs body (an int expression returning 0 or an FM_E* code) inside
 * BEGIN IMMEDIATE ... COMMIT, rolling back on failure, and returns from the
 * calling function with the result. */
#define IN_TX(s, err, body)                                                                        \
    do {                                                                                           \
        int tx_rc_ = sql__begin((s), (err));                                                       \
        if (tx_rc_)                                                                                \
            return tx_rc_;                                                                         \
        tx_rc_ = (body);                                                                           \
        if (!tx_rc_)                                                                               \
            return sql__commit((s), (err));                                                        \
        sql__rollback(s);                                                                          \
        return tx_rc_;                                                                             \
    } while (0)

/* Appends a registry event inside the current transaction. */
int sql__event(sqlite_store *s, int kind, const char *subject, fm_errbuf *err);

/* Inserts a device (and its first certificate if d->cert_serial is set)
 * inside the caller's transaction. */
int sql__insert_device(sqlite_store *s, const fm_device *d, fm_errbuf *err);
/* Inserts an active certificate + a device event inside the caller's
 * transaction. */
int sql__key_owner(fm_store *s, const char *key_id, char *device_id, size_t id_len);
int sql__insert_cert(sqlite_store *s, const char *device_id, const char *serial,
                     const char *pem, const char *key_id, int64_t not_after_ms, fm_errbuf *err);
/* Reads the columns id, tenant, status, cert_serial, created_ms,
 * device_group, serial_number (in that order) of a row. */
void sql__read_device(sqlite3_stmt *st, fm_device *out);

/* The registry part of the vtable (sqlite_registry.c); see store.h. */
int sql__template_add(fm_store *s, const fm_template *t, const char *const *serials, size_t n,
                      fm_errbuf *err);
int sql__template_get(fm_store *s, const char *name, fm_template *out);
int sql__template_set_status(fm_store *s, const char *name, int status, fm_errbuf *err);
int sql__template_list(fm_store *s, fm_template_cb cb, void *ud);
int sql__template_serial_allowed(fm_store *s, const char *name, const char *serial);
int sql__claim_cert_add(fm_store *s, const char *tmpl, const char *serial, fm_errbuf *err);
int sql__claim_certs(fm_store *s, const char *tmpl, fm_serial_cb cb, void *ud);
int sql__cert_add(fm_store *s, const char *device_id, const char *serial, const char *pem,
                  int64_t not_after_ms, fm_errbuf *err);
int sql__device_certs(fm_store *s, const char *device_id, fm_serial_cb cb, void *ud);
int sql__device_revoke(fm_store *s, const char *id, fm_errbuf *err);
int sql__device_list(fm_store *s, fm_device_cb cb, void *ud);
int sql__revoked_certs(fm_store *s, fm_serial_cb cb, void *ud);
int sql__expire_grace(fm_store *s, int64_t now_ms, long *expired, fm_errbuf *err);
int sql__provision_lookup(fm_store *s, const char *serial_number, char *device_id,
                          size_t id_len, char **cert_pem);
int sql__provision_commit(fm_store *s, const fm_provision *p, fm_errbuf *err);
int sql__rotate_commit(fm_store *s, const char *dev, const char *serial, const char *pem,
                       const char *key_id, int64_t not_after, const char *old,
                       int64_t grace_until, fm_errbuf *err);
int sql__shadow_get(fm_store *s, const char *device_id, fm_shadow *out);
int sql__shadow_put(fm_store *s, const char *dev, const char *desired, const char *reported,
                    int64_t expected, int64_t *new_version, int notify, fm_errbuf *err);
int sql__events_after(fm_store *s, int64_t after, size_t limit, fm_event_cb cb, void *ud);
int sql__events_max(fm_store *s, int64_t *out);

/* The API-data part of the vtable (sqlite_api.c); see store.h. */
int sql__device_page(fm_store *s, const char *tenant, const char *after_id, size_t limit,
                     fm_device_cb cb, void *ud);
int sql__presence_set(fm_store *s, const char *node, const fm_presence_update *u, size_t n);
int sql__totp_get(fm_store *s, int64_t user_id, fm_totp *out);
int sql__totp_set(fm_store *s, int64_t user_id, const unsigned char *secret, size_t len,
                  int64_t now_ms, fm_errbuf *err);
int sql__totp_use(fm_store *s, int64_t user_id, int64_t step, int confirm, fm_errbuf *err);
int sql__totp_delete(fm_store *s, int64_t user_id, fm_errbuf *err);
int sql__presence_reset(fm_store *s, const char *node, int64_t at_ms);
int sql__presence_get(fm_store *s, const char *device_id, fm_presence *out);
int sql__presence_changes(fm_store *s, int64_t after_rev, size_t limit,
                          fm_presence_change_cb cb, void *ud);
int sql__presence_rev(fm_store *s, int64_t *rev);
int sql__label_history(fm_store *s, const char *device_id, const char *measurement_id,
                       fm_label_cb cb, void *ud);
int sql__measurement_page(fm_store *s, const fm_measurement_query *q, fm_record_cb cb,
                          void *ud);
int sql__measurement_get(fm_store *s, const char *device_id, const char *measurement_id,
                         fm_record_cb cb, void *ud);
int sql__label_put(fm_store *s, fm_label *l, fm_errbuf *err);
int sql__label_get(fm_store *s, const char *device_id, const char *measurement_id,
                   fm_label *out, char *source, size_t source_len, char *by, size_t by_len);
int sql__audit_append(fm_store *s, fm_audit *a, fm_errbuf *err);
int sql__audit_page(fm_store *s, const fm_audit_filter *f, size_t limit, fm_audit_cb cb,
                    void *ud);

#endif
