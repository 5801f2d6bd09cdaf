/*
 * Data lake: committed measurements (with results and model version),
 * quarantined payloads, labels (reference values entered for measurements)
 * and the audit log, exported as Hive-partitioned, gzip-compressed NDJSON
 * objects:
 *
 *   raw/tenant=<t>/date=<YYYY-MM-DD>/hour=<HH>/<node>-<seq>.ndjson.gz
 *   quarantine/tenant=<t>/date=<YYYY-MM-DD>/hour=<HH>/<node>-<seq>.ndjson.gz
 *   labels/tenant=<t>/date=<YYYY-MM-DD>/hour=<HH>/<node>-<seq>.ndjson.gz
 *   logs/tenant=<t>/date=<YYYY-MM-DD>/hour=<HH>/<node>-<seq>.ndjson.gz
 *
 * where <seq> is the store sequence number of the first row in the object
 * (zero-padded to 12 digits so names sort); each area is one store stream
 * (enum fm_lake_stream) with its own seqs and cursor. raw and quarantine
 * are partitioned by the time the payload was received, labels by the
 * time the label was written, logs by the time of the audited action (an
 * action concerning no tenant goes to tenant=_). Objects are built in a local
 * spool file and handed to a backend (fs.c: a directory; s3.c: any
 * S3-compatible store) that makes them visible atomically: a reader never
 * sees a partial object.
 *
 * The writer resumes from the store, not from memory: its cursor (last
 * exported seq) lives in the database and is advanced together with the
 * name of the object being published, so after a crash every committed row
 * ends up in exactly one object. When several tenants' rows interleave, one
 * cursor step publishes one object per partition (listed in a manifest in
 * the spool dir) rather than one tiny object per tenant switch; see
 * src/lake/writer.c for the protocol and the crash-consistency argument.
 */
#ifndef FLEETML_LAKE_H
#define FLEETML_LAKE_H

#include "fleetml/config.h"
#include "fleetml/core.h"
#include "fleetml/store.h"

#include <stdio.h>

typedef struct fm_lake fm_lake;

/* Called with each key of a listing; non-zero stops it with that code. */
typedef int (*fm_lake_key_cb)(void *ud, const char *key);

typedef struct fm_lake_vtable {
    const char *name;
    /* Publishes the complete local file spool_path under key, atomically;
     * on success the spool file is gone (moved or deleted). Idempotent for
     * the same key/content. Returns 0, FM_ENOSPC, FM_EIO. */
    int (*put)(fm_lake *l, const char *key, const char *spool_path, fm_errbuf *err);
    /* True (1) if key exists, 0 if not, negative FM_E* on error. */
    int (*exists)(fm_lake *l, const char *key);
    /* Calls cb for every object whose key starts with prefix, in byte
     * order of the keys. Returns 0, FM_EIO/FM_EPROTO with err, or cb's
     * code. */
    int (*list)(fm_lake *l, const char *prefix, fm_lake_key_cb cb, void *ud, fm_errbuf *err);
    /* Opens object key for reading: *out is at its first byte and is the
     * caller's to fclose. Returns 0, FM_ENOTFOUND or FM_EIO with err. */
    int (*open_read)(fm_lake *l, const char *key, FILE **out, fm_errbuf *err);
    /* Deletes key; an absent key is not an error. Returns 0 or FM_EIO. */
    int (*remove)(fm_lake *l, const char *key, fm_errbuf *err);
    void (*close)(fm_lake *l);
} fm_lake_vtable;

struct fm_lake {
    const fm_lake_vtable *vt;
    char spool_dir[PATH_MAX]; /* where objects are built */
};

/* Reading the lake back (training): calls cb(ud, key, line, len) for every
 * line of every object of area ("raw", "labels", ...; only tenant's when
 * tenant is not NULL), objects in key order. The line is NUL-terminated and
 * borrowed for the call; cb returning non-zero stops the walk with that
 * code. *objects counts the objects read. Works on every backend. Returns
 * 0, FM_EIO/FM_EPROTO (an unreadable object or listing; err says which),
 * FM_EINVAL (configuration) or cb's code. */
typedef int (*fm_lake_line_cb)(void *ud, const char *key, const char *line, size_t len);
int fm_lake_read_area(const fm_config *cfg, const char *area, const char *tenant,
                      fm_lake_line_cb cb, void *ud, size_t *objects, fm_errbuf *err);

/* Opens the configured lake backend (creating directories as needed).
 * Returns 0 and *out (close with fm_lake_close), FM_EIO, FM_EINVAL (unknown
 * backend, path too long, an S3 setting that cannot work, no S3
 * credentials). Opening S3 sends no request. */
int fm_lake_open(const fm_config *cfg, fm_lake **out, fm_errbuf *err);
static inline void fm_lake_close(fm_lake *l) { if (l) l->vt->close(l); }
static inline int fm_lake_put(fm_lake *l, const char *key, const char *spool, fm_errbuf *err)
{ return l->vt->put(l, key, spool, err); }

/* A round trip through the configured backend (`fleetml lake check`): an
 * object of bytes random bytes under _check/<node>-<ms>.bin is put (on S3,
 * in parts when larger than lake.s3_part_bytes), found by name and in the
 * listing, read back and compared (SHA-256), then deleted. Returns 0 with
 * *rep, or the first failure with err naming the step. */
typedef struct fm_lake_check_report {
    char backend[8];
    char key[160];
    size_t bytes;
    int64_t put_ms, get_ms;
} fm_lake_check_report;
int fm_lake_check(const fm_config *cfg, size_t bytes, fm_lake_check_report *rep,
                  fm_errbuf *err);

/* Builds an object key into buf:
 *   <area>/tenant=<tenant>/date=YYYY-MM-DD/hour=HH/<node>-<seq 12 digits>.ndjson.gz
 * for the UTC hour containing ms. Tenant and node names are sanitised
 * (anything but [A-Za-z0-9_.-] becomes '_'; an empty tenant, as for a
 * quarantined payload from an unknown device, becomes "_"). Returns 0 or
 * FM_EINVAL if it does not fit or first_seq is negative. */
int fm_lake_object_key(char *buf, size_t len, const char *area, const char *tenant,
                       int64_t ms, const char *node, int64_t first_seq);

/* Rolling policy: an open object is closed when adding a row would change
 * its partition (area/tenant/date/hour), when it holds >= roll_bytes of
 * uncompressed data, or when it has been open >= roll_ms (a limit <= 0 is
 * disabled). row_partition NULL asks about age and size only (a timer
 * check); open_partition NULL or "" means nothing is open (never roll).
 * Returns 1 to roll, 0 not to. Pure function so it can be unit-tested. */
typedef struct fm_lake_roll {
    long roll_bytes;
    int64_t roll_ms;
} fm_lake_roll;
int fm_lake_should_roll(const fm_lake_roll *p, const char *open_partition,
                        long open_bytes, int64_t open_since_ms, const char *row_partition,
                        int64_t now_ms);

/* The export thread. fm_lake_writer_start opens its own store handle and
 * lake backend, recovers any half-published object, then exports committed
 * rows as they appear (poked by fm_lake_writer_notify). stop flushes the
 * open object and joins. Returns 0 or an FM_E* code with err set: a
 * store that cannot be opened or an invalid lake configuration fails
 * start-up; an unwritable lake or a lake locked by another exporter does
 * not (the thread logs it, counts lake_errors and retries with backoff up
 * to ~5 s). Only one exporter runs per lake directory (a flock in the spool
 * dir); the writer is stopped and freed by fm_lake_writer_stop.
 * notify is cheap and may be called from any thread (NULL is ignored). */
typedef struct fm_lake_writer fm_lake_writer;
int fm_lake_writer_start(const fm_config *cfg, fm_lake_writer **out, fm_errbuf *err);
void fm_lake_writer_notify(fm_lake_writer *w);
/* Forces the open objects to be closed and published now; blocks until
 * done. Returns 0 or the first error. */
int fm_lake_writer_flush(fm_lake_writer *w);
void fm_lake_writer_stop(fm_lake_writer *w);

/* Several nodes on one database export its rows once: the export is a
 * cluster-wide job that runs only on the node holding the store lease
 * FM_LAKE_LEASE (see fm_store_lease), renewed every few seconds and taken
 * over by another node FM_LAKE_LEASE_MS after its holder stops renewing.
 * The export cursors belong to the cluster (owner FM_LAKE_CURSOR_OWNER),
 * not to a node, so the next holder continues where the last one stopped;
 * object names carry the node id of the node that wrote them. */
#define FM_LAKE_LEASE "lake-export"
#define FM_LAKE_LEASE_MS 15000
#define FM_LAKE_CURSOR_OWNER "cluster"

/* One-shot export used by the writer and by `fleetml lake flush`: exports
 * everything committed up to now and publishes it. Returns 0, FM_EBUSY
 * when another exporter (e.g. the running service) holds the lake or
 * another node holds the export lease, or the
 * first error (FM_EIO, FM_ENOSPC, FM_EDB...) with err set; on failure the
 * cursor is left where it was, so nothing is lost or duplicated. */
int fm_lake_export_all(const fm_config *cfg, fm_errbuf *err);

#endif
