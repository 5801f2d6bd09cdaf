/*
 * Lake export: turns committed store rows into published lake objects,
 * exactly once, across crashes.
 *
 * Units of work. For each stream (raw, quarantine, labels, audit logs) the
 * exporter keeps one open *batch*: the rows after the stream's cursor,
 * appended in seq order to one gzip spool file per partition (tenant + UTC
 * hour). A batch is the unit the cursor moves by: it covers a contiguous seq
 * range (cursor, last], so "cursor = N" always means "every row <= N is in
 * the lake". When a single tenant is active (the common case) a batch is
 * exactly one object; with interleaved tenants it holds one object per
 * partition, up to LAKE_MAX_OPEN, instead of closing a tiny object at every
 * tenant switch.
 *
 * Publishing a batch (publish_batch):
 *   1. finish every gzip stream, fsync every spool file and the spool dir;
 *   2. cursor_set(last_seq = last row, pending_key = first object's key,
 *      pending_spool = the spool file, or a manifest listing key/spool
 *      pairs when the batch has several objects) -- the commit point;
 *   3. put every object (rename into the lake, fsync dirs);
 *   4. cursor_set(pending cleared); remove the manifest.
 *
 * Crash argument. Before 2 commits, the cursor is unchanged, so the rows are
 * re-read from the store on restart and the spool files are stale: recovery
 * deletes them (no object was put, since puts happen only after 2). After 2
 * commits, the pending fields name every object of the batch, and their
 * spool files are durable (step 1). Recovery re-puts every spool file that
 * still exists; one that is gone was already renamed into the lake (put is
 * the only thing that removes a spool file between 2 and 4). Either way each
 * row of the batch ends up in exactly one object, and the cursor is already
 * past them, so they are never exported again. The only way for a pending
 * spool to be gone without a put is a cursor_set that reported failure but
 * did commit (we then delete the spools); recovery detects this (object
 * absent from the lake) and rewinds the cursor to just before the object's
 * first seq, which re-exports exactly the lost rows.
 *
 * Only one exporter may run per lake: the spool directory holds a flock so
 * `fleetml lake flush` cannot race the service's writer thread (two
 * exporters would share the cursor and delete each other's spool files),
 * and across nodes sharing a database only the holder of the store lease
 * FM_LAKE_LEASE exports (the others stand by and take over when it stops
 * renewing). The cursors are the cluster's (FM_LAKE_CURSOR_OWNER). Before
 * moving a cursor the holder makes sure its lease has LAKE_LEASE_MARGIN_MS
 * left, so a holder that stalls longer than that loses the lease before it
 * could commit on top of its successor's work. A pending object that
 * another node named is settled from the lake alone (its spool files are on
 * that node): present means put; absent means its rows are exported again,
 * so a takeover in the middle of a put can export a batch twice (under two
 * node names), never lose one.
 */
#include "fleetml/json.h"
#include "fleetml/lake.h"
#include "fleetml/metrics.h"
#include "fleetml/thread.h"
#include "lake/lake_int.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <sys/resource.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <libdeflate.h>

#define LAKE_MAX_OPEN 16     /* partitions (objects) per batch */
#define LAKE_SCAN_LIMIT 256  /* rows per store scan call */
#define LAKE_TICK_MS 200     /* writer wake-up period */
#define LAKE_NICE 10         /* scheduling priority of the writer thread */
#define LAKE_BACKOFF_MAX_MS 5000
#define LAKE_LEASE_RENEW_MS (FM_LAKE_LEASE_MS / 3)  /* renew when this much is used */
#define LAKE_LEASE_MARGIN_MS (FM_LAKE_LEASE_MS / 3) /* left, at least, to move a cursor */
#define LAKE_LOCK_NAME ".lock"
#define LAKE_COMPONENT "lake"

/* Spool files are gzip, written as a series of gzip members of at most
 * LAKE_MEMBER_BYTES of NDJSON each, compressed whole by libdeflate (about
 * twice zlib's speed at its fastest level, for the same ratio). A
 * multi-member file is one gzip file to every reader (RFC 1952 2.2; gzip,
 * zcat, zlib's gzread, Python's gzip, pandas). */
#define LAKE_MEMBER_BYTES (256 * 1024)

typedef struct lake_obj {
    char partition[400];
    char tenant[256];
    char key[512];
    char spool[PATH_MAX];
    int fd;
    char *pending; /* NDJSON not yet compressed (fm_malloc'd) */
    size_t pending_len, pending_cap;
    long bytes; /* uncompressed, for the roll policy */
    uint64_t rows;
} lake_obj;

typedef struct lake_stream {
    enum fm_lake_stream st;
    const char *area;
    int64_t cursor;  /* last seq durably published (as read from the store) */
    int64_t published; /* last seq whose object is in the lake (cursor minus a
                        * committed batch whose put has not succeeded yet) */
    int64_t pos;     /* last seq appended to the open batch; == cursor if none */
    int64_t opened_ms; /* monotonic ms when the batch's first object opened */
    int nobj;
    lake_obj obj[LAKE_MAX_OPEN];
} lake_stream;

typedef struct lake_exporter {
    fm_config cfg;
    fm_store *store;
    fm_lake *lake;
    int lock_fd;
    bool recovered; /* cursors loaded, pending objects settled, spool clean */
    fm_lake_roll roll;
    lake_stream s[FM_STREAM_COUNT];
    char *line; /* reusable NDJSON line buffer */
    size_t line_cap;
    struct libdeflate_compressor *deflate; /* level 1 */
    char *member;                          /* one compressed member */
    size_t member_cap;
    int last_rc; /* for logging state changes only */
    int64_t lease_until;   /* monotonic ms our lease runs to; 0 = not held */
    int64_t lease_renewed; /* monotonic ms of the last successful renewal */
    char lease_owner[64];  /* the holder seen last time we were refused */
    bool standby;          /* another node holds the lease: not an error */
} lake_exporter;

static int64_t mono_ms(void) { return (int64_t)(fm_mono_ns() / 1000000u); }

static int io_code(int e) { return e == ENOSPC || e == EDQUOT ? FM_ENOSPC : FM_EIO; }

/* ---- row formatting ---------------------------------------------------- */

static char *base64(const unsigned char *p, size_t n)
{
    static const char tab[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char *out = fm_malloc((n + 2) / 3 * 4 + 1), *o = out;
    if (!out)
        return NULL;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)p[i + 1] << 8;
        if (i + 2 < n)
            v |= p[i + 2];
        *o++ = tab[(v >> 18) & 63];
        *o++ = tab[(v >> 12) & 63];
        *o++ = i + 1 < n ? tab[(v >> 6) & 63] : '=';
        *o++ = i + 2 < n ? tab[v & 63] : '=';
    }
    *o = '\0';
    return out;
}

/* Serialises obj (consumed) into ex->line. Returns the length or a negative
 * FM_E* code. */
static long dump_line(lake_exporter *ex, json_t *obj)
{
    if (!obj)
        return FM_ENOMEM;
    size_t need = json_dumpb(obj, ex->line, ex->line_cap, JSON_COMPACT);
    if (need > ex->line_cap) {
        size_t cap = need + 1024;
        char *nb = fm_realloc(ex->line, cap);
        if (!nb) {
            json_decref(obj);
            return FM_ENOMEM;
        }
        ex->line = nb;
        ex->line_cap = cap;
        need = json_dumpb(obj, ex->line, ex->line_cap, JSON_COMPACT);
    }
    json_decref(obj);
    return need == 0 || need > ex->line_cap ? FM_ENOMEM : (long)need;
}

/* Appends n bytes to ex->line at *len, growing it. Returns 0 or FM_ENOMEM. */
static int line_append(lake_exporter *ex, size_t *len, const char *p, size_t n)
{
    if (*len + n + 1 > ex->line_cap) {
        size_t cap = (*len + n + 1) * 2;
        char *nb = fm_realloc(ex->line, cap);
        if (!nb)
            return FM_ENOMEM;
        ex->line = nb;
        ex->line_cap = cap;
    }
    memcpy(ex->line + *len, p, n);
    *len += n;
    return 0;
}

/* The payload and result are stored as validated JSON text, so they are
 * spliced into the line as they are instead of being parsed and printed
 * again: re-printing a sweep's hundreds of doubles cost more CPU than the
 * rest of the pipeline. Valid JSON holds CR/LF only as whitespace between
 * tokens (never raw inside strings), so turning them into spaces keeps the
 * value identical and the object on one line.
 */
static int append_json_text(lake_exporter *ex, size_t *len, const char *text, size_t n)
{
    if (!text || n == 0)
        return line_append(ex, len, "null", 4);
    size_t start = *len;
    int rc = line_append(ex, len, text, n);
    if (rc)
        return rc;
    /* memchr is vectorised; valid payloads rarely hold a line break. */
    for (int c = '\n'; c; c = c == '\n' ? '\r' : 0) {
        char *p = ex->line + start, *end = ex->line + *len;
        while ((p = memchr(p, c, (size_t)(end - p))))
            *p++ = ' ';
    }
    return 0;
}

static long format_record(lake_exporter *ex, const fm_record *r)
{
    json_t *o = json_object();
    if (!o)
        return FM_ENOMEM;
    json_object_set_new(o, "seq", json_integer(r->seq));
    json_object_set_new(o, "device_id", fm_json_str(r->device_id));
    json_object_set_new(o, "tenant", fm_json_str(r->tenant));
    json_object_set_new(o, "measurement_id", fm_json_str(r->measurement_id));
    json_object_set_new(o, "received_at", fm_json_time(r->received_ms));
    json_object_set_new(o, "taken_at", fm_json_time(r->taken_ms));
    json_object_set_new(o, "model", fm_json_str(r->model));
    long head = dump_line(ex, o);
    if (head < 2)
        return head < 0 ? head : FM_ENOMEM;
    /* Reopen the object: drop its closing brace and append the two
     * embedded documents. */
    size_t len = (size_t)head - 1;
    int rc = line_append(ex, &len, ",\"measurement\":", 15);
    if (!rc)
        rc = append_json_text(ex, &len, r->payload, r->payload_len);
    if (!rc)
        rc = line_append(ex, &len, ",\"result\":", 10);
    if (!rc)
        rc = append_json_text(ex, &len, r->result_json,
                              r->result_json ? strlen(r->result_json) : 0);
    if (!rc && r->shadow_json) {
        rc = line_append(ex, &len, ",\"shadow\":", 10);
        if (!rc)
            rc = append_json_text(ex, &len, r->shadow_json, strlen(r->shadow_json));
    }
    if (!rc)
        rc = line_append(ex, &len, "}", 1);
    return rc ? rc : (long)len;
}

/* A stored JSON object (validated when written), parsed; null if it is
 * not an object after all. */
static json_t *stored_object(const char *text)
{
    json_t *j = text ? json_loads(text, 0, NULL) : NULL;
    if (json_is_object(j))
        return j;
    json_decref(j);
    return json_null();
}

/* labels/: {"seq","device_id","tenant","measurement_id","outputs":{...},
 * "source","labelled_by","labelled_at"} (docs/protocol.md, the lake). */
static long format_label(lake_exporter *ex, const fm_label *l)
{
    json_t *o = json_object();
    if (!o)
        return FM_ENOMEM;
    json_object_set_new(o, "seq", json_integer(l->seq));
    json_object_set_new(o, "device_id", fm_json_str(l->device_id));
    json_object_set_new(o, "tenant", fm_json_str(l->tenant));
    json_object_set_new(o, "measurement_id", fm_json_str(l->measurement_id));
    json_object_set_new(o, "outputs", stored_object(l->outputs_json));
    json_object_set_new(o, "source", fm_json_str(l->source));
    json_object_set_new(o, "labelled_by", fm_json_str(l->labelled_by));
    json_object_set_new(o, "labelled_at", fm_json_time(l->at_ms));
    return dump_line(ex, o);
}

/* logs/: {"seq","at","tenant","actor","action","target","outcome",
 * "client","details":{...}}. */
static long format_audit(lake_exporter *ex, const fm_audit *a)
{
    json_t *o = json_object();
    if (!o)
        return FM_ENOMEM;
    json_object_set_new(o, "seq", json_integer(a->seq));
    json_object_set_new(o, "at", fm_json_time(a->at_ms));
    json_object_set_new(o, "tenant", fm_json_str(a->tenant));
    json_object_set_new(o, "actor", fm_json_str(a->actor));
    json_object_set_new(o, "action", fm_json_str(a->action));
    json_object_set_new(o, "target", fm_json_str(a->target));
    json_object_set_new(o, "outcome", fm_json_str(a->outcome));
    json_object_set_new(o, "client", fm_json_str(a->client));
    json_object_set_new(o, "details", stored_object(a->details_json));
    return dump_line(ex, o);
}

static long format_quarantine(lake_exporter *ex, const fm_quarantine *q)
{
    json_t *o = json_object(), *e = json_object();
    if (!o || !e) {
        json_decref(o);
        json_decref(e);
        return FM_ENOMEM;
    }
    json_object_set_new(o, "seq", json_integer(q->seq));
    json_object_set_new(o, "device_id", fm_json_str(q->device_id));
    json_object_set_new(o, "tenant", fm_json_str(q->tenant));
    json_object_set_new(o, "received_at", fm_json_time(q->received_ms));
    json_object_set_new(e, "code", fm_json_str(q->error_code));
    json_object_set_new(e, "message", fm_json_str(q->error_message));
    json_object_set_new(o, "error", e);
    /* Quarantined payloads are arbitrary bytes: keep them readable when
     * they are text, and lossless (base64) when they are not. */
    json_t *p = q->payload ? json_stringn(q->payload, q->payload_len) : json_string("");
    if (p) {
        json_object_set_new(o, "payload", p);
    } else {
        char *b = base64((const unsigned char *)q->payload, q->payload_len);
        if (!b) {
            json_decref(o);
            return FM_ENOMEM;
        }
        json_object_set_new(o, "payload_base64", json_string(b));
        fm_free(b);
    }
    return dump_line(ex, o);
}

/* ---- objects and batches ---------------------------------------------- */

static void obj_abort(lake_obj *o)
{
    if (o->fd >= 0)
        close(o->fd);
    o->fd = -1;
    fm_free(o->pending);
    o->pending = NULL;
    o->pending_len = o->pending_cap = 0;
    unlink(o->spool);
}

/* Compresses what is pending into one gzip member and appends it to the
 * spool file. */
static int obj_flush(lake_exporter *ex, lake_obj *o, fm_errbuf *err)
{
    if (o->pending_len == 0)
        return 0;
    size_t bound = libdeflate_gzip_compress_bound(ex->deflate, o->pending_len);
    if (bound > ex->member_cap) {
        char *p = fm_realloc(ex->member, bound);
        if (!p)
            return fm_errf(err, FM_ENOMEM, "lake: out of memory compressing %s", o->spool);
        ex->member = p;
        ex->member_cap = bound;
    }
    size_t n = libdeflate_gzip_compress(ex->deflate, o->pending, o->pending_len, ex->member,
                                        ex->member_cap);
    if (n == 0)
        return fm_errf(err, FM_EIO, "lake: compressing %s failed", o->spool);
    for (size_t off = 0; off < n;) {
        ssize_t w = write(o->fd, ex->member + off, n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return fm_errf(err, w < 0 ? io_code(errno) : FM_EIO, "lake: writing %s: %s",
                           o->spool, w < 0 ? strerror(errno) : "short write");
        off += (size_t)w;
    }
    o->pending_len = 0;
    return 0;
}

/* Drops the open batch: its spool files are partial and unpublished, and
 * the cursor was not moved, so the rows will simply be read again. */
static void batch_abort(lake_stream *s)
{
    for (int i = 0; i < s->nobj; i++)
        obj_abort(&s->obj[i]);
    s->nobj = 0;
    s->pos = s->cursor;
}

/* Writes the last gzip member and makes the spool file durable. */
static int obj_seal(lake_exporter *ex, lake_obj *o, fm_errbuf *err)
{
    int rc = obj_flush(ex, o, err);
    fm_free(o->pending);
    o->pending = NULL;
    o->pending_len = o->pending_cap = 0;
    if (rc != 0) {
        close(o->fd);
        o->fd = -1;
        return rc;
    }
    rc = fm_fsync_fd(o->fd);
    if (close(o->fd) != 0 && rc == 0)
        rc = io_code(errno);
    o->fd = -1;
    if (rc != 0)
        return fm_errf(err, rc, "lake: fsync %s failed", o->spool);
    return 0;
}

static int obj_open(lake_exporter *ex, lake_stream *s, lake_obj *o, const char *partition,
                    const char *tenant, int64_t ms, int64_t seq, fm_errbuf *err)
{
    memset(o, 0, sizeof *o);
    o->fd = -1;
    snprintf(o->partition, sizeof o->partition, "%s", partition);
    snprintf(o->tenant, sizeof o->tenant, "%s", tenant);
    int rc = fm_lake_object_key(o->key, sizeof o->key, s->area, tenant, ms, ex->cfg.node_id, seq);
    if (rc != 0)
        return fm_errf(err, rc, "lake: cannot name object for seq %" PRId64, seq);
    /* Spool names are unique per stream because every seq starts at most
     * one object. */
    int n = snprintf(o->spool, sizeof o->spool, "%s/%s-%012" PRId64 ".ndjson.gz",
                     ex->lake->spool_dir, s->area, seq);
    if (n < 0 || (size_t)n >= sizeof o->spool)
        return fm_errf(err, FM_EINVAL, "lake: spool path too long");
    o->fd = open(o->spool, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (o->fd < 0)
        return fm_errf(err, io_code(errno), "lake: cannot create %s: %s", o->spool,
                       strerror(errno));
    return 0;
}

static int obj_append(lake_exporter *ex, lake_obj *o, const char *line, long len,
                      fm_errbuf *err)
{
    size_t need = o->pending_len + (size_t)len + 1;
    if (need > o->pending_cap) {
        size_t cap = need > LAKE_MEMBER_BYTES ? need : LAKE_MEMBER_BYTES;
        char *p = fm_realloc(o->pending, cap);
        if (!p)
            return fm_errf(err, FM_ENOMEM, "lake: out of memory writing %s", o->spool);
        o->pending = p;
        o->pending_cap = cap;
    }
    memcpy(o->pending + o->pending_len, line, (size_t)len);
    o->pending[o->pending_len + (size_t)len] = '\n';
    o->pending_len = need;
    o->bytes += len + 1;
    o->rows++;
    return o->pending_len >= LAKE_MEMBER_BYTES ? obj_flush(ex, o, err) : 0;
}

static bool batch_should_roll(const lake_exporter *ex, const lake_stream *s,
                              const char *row_partition, int64_t now)
{
    for (int i = 0; i < s->nobj; i++) {
        const lake_obj *o = &s->obj[i];
        /* A row only ever goes to the object of its own partition, so the
         * policy is asked about that object with the row and about the
         * others as a timer check (age and size). */
        const char *rp = row_partition && strcmp(row_partition, o->partition) == 0
                             ? row_partition : NULL;
        if (fm_lake_should_roll(&ex->roll, o->partition, o->bytes, s->opened_ms, rp, now))
            return true;
    }
    return false;
}

static int write_manifest(lake_exporter *ex, lake_stream *s, char *path, size_t len,
                          fm_errbuf *err)
{
    size_t cap = (size_t)s->nobj * (512 + PATH_MAX + 2) + 1, n = 0;
    char *text = fm_malloc(cap);
    if (!text)
        return fm_errf(err, FM_ENOMEM, "lake: out of memory");
    for (int i = 0; i < s->nobj; i++)
        n += (size_t)snprintf(text + n, cap - n, "%s\t%s\n", s->obj[i].key, s->obj[i].spool);
    int m = snprintf(path, len, "%s/%s-%012" PRId64 ".manifest", ex->lake->spool_dir, s->area,
                     s->cursor + 1);
    int rc = m < 0 || (size_t)m >= len ? FM_EINVAL : fm_write_file_atomic(path, text, n, 0644);
    fm_free(text);
    return rc ? fm_errf(err, rc, "lake: cannot write manifest %s", path) : 0;
}

static bool is_manifest(const char *p)
{
    size_t n = strlen(p), m = strlen(".manifest");
    return n > m && strcmp(p + n - m, ".manifest") == 0;
}

/* Takes the export lease, or renews it when a third of it is used (or,
 * before_commit, when less than LAKE_LEASE_MARGIN_MS of it is left).
 * Returns 0 when this node holds it, FM_EBUSY when another node does
 * (ex->standby set, err names the holder), or the store's error. The lease
 * is counted from before the request, so our view of it never outlasts the
 * database's. */
static int lease_check(lake_exporter *ex, bool before_commit, fm_errbuf *err)
{
    int64_t now = mono_ms();
    if (ex->lease_until && now - ex->lease_renewed < LAKE_LEASE_RENEW_MS &&
        !(before_commit && ex->lease_until - now < LAKE_LEASE_MARGIN_MS))
        return 0;
    char owner[sizeof ex->lease_owner] = "";
    int rc = fm_store_lease(ex->store, FM_LAKE_LEASE, ex->cfg.node_id, FM_LAKE_LEASE_MS, owner,
                            sizeof owner);
    fm_metrics *m = fm_metrics_get();
    if (rc == 0) {
        if (!ex->lease_until) {
            fm_logkv(FM_LOG_INFO, LAKE_COMPONENT, "this node runs the lake export", "node",
                     ex->cfg.node_id, NULL);
            ex->recovered = false; /* the last holder moved the cursors */
        }
        ex->lease_until = now + FM_LAKE_LEASE_MS;
        ex->lease_renewed = now;
        ex->lease_owner[0] = '\0';
        ex->standby = false;
        atomic_store(&m->lake_lease_held, 1);
        return 0;
    }
    bool had = ex->lease_until != 0;
    ex->lease_until = 0;
    atomic_store(&m->lake_lease_held, 0);
    if (rc != FM_EBUSY)
        return fm_errf(err, rc, "lake: cannot take the export lease: %s", fm_strerror(rc));
    if (had || strcmp(owner, ex->lease_owner) != 0)
        fm_logkv(FM_LOG_INFO, LAKE_COMPONENT, "the lake export runs on another node", "holder",
                 owner, NULL);
    snprintf(ex->lease_owner, sizeof ex->lease_owner, "%s", owner);
    ex->standby = true;
    return fm_errf(err, FM_EBUSY, "lake: the export runs on node %s (it holds the %s lease)",
                   owner, FM_LAKE_LEASE);
}

/* See the file comment for the protocol and why it is crash-safe. */
static int publish_batch(lake_exporter *ex, lake_stream *s, fm_errbuf *err)
{
    if (s->nobj == 0)
        return 0;
    int rc = lease_check(ex, true, err);
    if (rc != 0)
        return rc;
    fm_lake_cursor c;
    memset(&c, 0, sizeof c);
    char manifest[PATH_MAX] = "";

    for (int i = 0; i < s->nobj && rc == 0; i++)
        rc = obj_seal(ex, &s->obj[i], err);
    if (rc == 0 && (rc = fm_fsync_dir(ex->lake->spool_dir)) != 0)
        fm_errf(err, rc, "lake: fsync %s failed", ex->lake->spool_dir);
    if (rc == 0 && s->nobj > 1)
        rc = write_manifest(ex, s, manifest, sizeof manifest, err);
    if (rc == 0) {
        const char *ps = s->nobj > 1 ? manifest : s->obj[0].spool;
        c.last_seq = s->pos;
        if (strlen(s->obj[0].key) >= sizeof c.pending_key || strlen(ps) >= sizeof c.pending_spool)
            rc = fm_errf(err, FM_EINVAL, "lake: spool path too long for the cursor");
        else {
            memcpy(c.pending_key, s->obj[0].key, strlen(s->obj[0].key) + 1);
            memcpy(c.pending_spool, ps, strlen(ps) + 1);
        }
    }
    if (rc == 0)
        rc = fm_store_lake_cursor_set(ex->store, FM_LAKE_CURSOR_OWNER, s->st, &c, err);
    if (rc != 0) {
        /* Not committed (or, rarely, committed but reported as failed:
         * recovery then finds the object missing and rewinds). */
        batch_abort(s);
        if (manifest[0])
            unlink(manifest);
        return rc;
    }

    /* Committed: the rows now belong to the pending objects, which
     * recovery will finish if anything below fails. */
    s->cursor = s->pos;
    uint64_t rows = 0;
    int nobj = s->nobj;
    s->nobj = 0;
    for (int i = 0; i < nobj; i++) {
        rc = fm_lake_put(ex->lake, s->obj[i].key, s->obj[i].spool, err);
        if (rc != 0)
            return rc; /* spool files stay for recovery */
        rows += s->obj[i].rows;
    }
    s->published = s->cursor;
    c.pending_key[0] = c.pending_spool[0] = '\0';
    /* Settled with the objects logged (lake.object.created) in one
     * transaction; if it fails, recovery settles them. */
    fm_lake_object objs[LAKE_MAX_OPEN];
    for (int i = 0; i < nobj; i++)
        objs[i] = (fm_lake_object){.tenant = s->obj[i].tenant, .area = s->area,
                                   .key = s->obj[i].key, .rows = (int64_t)s->obj[i].rows};
    rc = fm_store_lake_settle(ex->store, FM_LAKE_CURSOR_OWNER, s->st, &c, objs, (size_t)nobj,
                              err);
    if (rc != 0)
        return rc;
    if (manifest[0])
        unlink(manifest); /* stale once pending is cleared; cleanup would get it too */
    fm_metrics *m = fm_metrics_get();
    atomic_fetch_add(&m->lake_objects, (uint64_t)nobj);
    atomic_fetch_add(&m->lake_rows, rows);
    fm_logf(FM_LOG_DEBUG, LAKE_COMPONENT, "published %d object(s), %" PRIu64 " rows, %s up to %" PRId64,
            nobj, rows, s->area, s->cursor);
    return 0;
}

/* Adds one formatted row to the stream's batch. Returns 0, 1 when the batch
 * must be published before this row can be taken, or a negative FM_E*. */
static int batch_add(lake_exporter *ex, lake_stream *s, const char *tenant, int64_t ms,
                     int64_t seq, long len, fm_errbuf *err)
{
    char part[400];
    if (lake__partition(part, sizeof part, s->area, tenant ? tenant : "", ms) != 0)
        return fm_errf(err, FM_EINVAL, "lake: cannot partition seq %" PRId64, seq);
    int64_t now = mono_ms();
    if (batch_should_roll(ex, s, part, now))
        return 1;
    lake_obj *o = NULL;
    for (int i = 0; i < s->nobj && !o; i++)
        if (strcmp(s->obj[i].partition, part) == 0)
            o = &s->obj[i];
    if (!o) {
        if (s->nobj == LAKE_MAX_OPEN)
            return 1;
        o = &s->obj[s->nobj];
        int rc = obj_open(ex, s, o, part, tenant ? tenant : "", ms, seq, err);
        if (rc != 0)
            return rc;
        if (s->nobj++ == 0)
            s->opened_ms = now;
    }
    int rc = obj_append(ex, o, ex->line, len, err);
    if (rc == 0)
        s->pos = seq;
    return rc;
}

typedef struct scan_ctx {
    lake_exporter *ex;
    lake_stream *s;
    fm_errbuf *err;
    size_t seen;
    int rc;       /* error from inside the callback */
    bool need_roll;
} scan_ctx;

/* Adds a formatted row (len bytes in ex->line, or a negative error) to the
 * stream's batch; returns non-zero to stop the scan (a roll, or an error
 * kept in c->rc). */
static int scan_add(scan_ctx *c, long len, const char *tenant, int64_t ms, int64_t seq)
{
    c->seen++;
    int rc = len < 0 ? fm_errf(c->err, (int)len, "lake: cannot format seq %" PRId64, seq)
                     : batch_add(c->ex, c->s, tenant, ms, seq, len, c->err);
    if (rc == 1)
        c->need_roll = true;
    else if (rc < 0)
        c->rc = rc;
    return rc != 0;
}

static int on_record(void *ud, const fm_record *r)
{
    scan_ctx *c = ud;
    return scan_add(c, format_record(c->ex, r), r->tenant, r->received_ms, r->seq);
}

static int on_quarantine(void *ud, const fm_quarantine *q)
{
    scan_ctx *c = ud;
    return scan_add(c, format_quarantine(c->ex, q), q->tenant, q->received_ms, q->seq);
}

/* Labels go to the lake partitioned by the time they were written, audit
 * entries by the time of the action. */
static int on_label(void *ud, const fm_label *l)
{
    scan_ctx *c = ud;
    return scan_add(c, format_label(c->ex, l), l->tenant, l->at_ms, l->seq);
}

static int on_audit(void *ud, const fm_audit *a)
{
    scan_ctx *c = ud;
    return scan_add(c, format_audit(c->ex, a), a->tenant, a->at_ms, a->seq);
}

/* One scan call of the stream's kind. */
static int scan_stream(lake_exporter *ex, lake_stream *s, scan_ctx *c)
{
    switch (s->st) {
    case FM_STREAM_RAW:
        return fm_store_scan_records(ex->store, s->pos, LAKE_SCAN_LIMIT, on_record, c);
    case FM_STREAM_QUARANTINE:
        return fm_store_scan_quarantine(ex->store, s->pos, LAKE_SCAN_LIMIT, on_quarantine, c);
    case FM_STREAM_LABELS:
        return fm_store_scan_labels(ex->store, s->pos, LAKE_SCAN_LIMIT, on_label, c);
    case FM_STREAM_AUDIT:
        return fm_store_scan_audit(ex->store, s->pos, LAKE_SCAN_LIMIT, on_audit, c);
    default:
        return FM_EINVAL;
    }
}

/* Exports the rows committed after the stream's position. The batch is
 * published when the roll policy says so, or now if force is set. The store
 * is never written while a scan is running: a roll stops the scan, then the
 * batch is published, then scanning resumes. */
static int export_stream(lake_exporter *ex, lake_stream *s, bool force, fm_errbuf *err)
{
    for (;;) {
        scan_ctx c = {.ex = ex, .s = s, .err = err};
        int rc = scan_stream(ex, s, &c);
        if (c.rc != 0)
            return c.rc;
        if (rc < 0 && !c.need_roll)
            return fm_errf(err, rc, "lake: scanning %s rows failed: %s", s->area,
                           fm_strerror(rc));
        if (c.need_roll) {
            if ((rc = publish_batch(ex, s, err)) != 0)
                return rc;
            continue;
        }
        if (c.seen < LAKE_SCAN_LIMIT)
            break;
    }
    if (s->nobj > 0 && (force || batch_should_roll(ex, s, NULL, mono_ms())))
        return publish_batch(ex, s, err);
    return 0;
}

/* ---- recovery ------------------------------------------------------------ */

/* The pending object was never put and its spool is gone (see the file
 * comment): move the cursor back to just before its first row so those
 * rows are exported again. */
static void rewind_cursor(fm_lake_cursor *c)
{
    int64_t first;
    if (lake__key_first_seq(c->pending_key, &first) == 0 && first - 1 < c->last_seq) {
        fm_logf(FM_LOG_WARN, LAKE_COMPONENT,
                "pending object %s was never published; re-exporting from seq %" PRId64,
                c->pending_key, first);
        c->last_seq = first - 1;
    } else {
        fm_logf(FM_LOG_ERROR, LAKE_COMPONENT, "pending object %s is missing", c->pending_key);
    }
}

/* 1 when the pending object was named by this node, so its spool paths are
 * this node's files; another node's paths may name unrelated files here. */
static bool pending_is_ours(const lake_exporter *ex, const fm_lake_cursor *c)
{
    return lake__key_node_is(c->pending_key, ex->cfg.node_id);
}

/* The objects a recovery found in the lake (or put there), logged when
 * their cursor settles; their row counts are not known any more. */
typedef struct settled {
    char key[LAKE_MAX_OPEN][512];
    char tenant[LAKE_MAX_OPEN][256];
    int n;
    enum fm_lake_stream st;
} settled;

static int tenant_of_record(void *ud, const fm_record *r)
{
    snprintf(ud, 256, "%s", r->tenant ? r->tenant : "");
    return 1;
}
static int tenant_of_quarantine(void *ud, const fm_quarantine *q)
{
    snprintf(ud, 256, "%s", q->tenant ? q->tenant : "");
    return 1;
}
static int tenant_of_label(void *ud, const fm_label *l)
{
    snprintf(ud, 256, "%s", l->tenant ? l->tenant : "");
    return 1;
}
static int tenant_of_audit(void *ud, const fm_audit *a)
{
    snprintf(ud, 256, "%s", a->tenant ? a->tenant : "");
    return 1;
}

/* The tenant of a recovered object: that of its first row, read back from
 * the store (the key holds it only sanitised); the key's when the row is
 * gone (pruned quarantine). */
static void object_tenant(lake_exporter *ex, enum fm_lake_stream st, const char *key,
                          char out[256])
{
    int64_t first;
    out[0] = '\0';
    if (lake__key_first_seq(key, &first) == 0 && first > 0) {
        switch (st) {
        case FM_STREAM_RAW:
            fm_store_scan_records(ex->store, first - 1, 1, tenant_of_record, out);
            break;
        case FM_STREAM_QUARANTINE:
            fm_store_scan_quarantine(ex->store, first - 1, 1, tenant_of_quarantine, out);
            break;
        case FM_STREAM_LABELS:
            fm_store_scan_labels(ex->store, first - 1, 1, tenant_of_label, out);
            break;
        case FM_STREAM_AUDIT:
            fm_store_scan_audit(ex->store, first - 1, 1, tenant_of_audit, out);
            break;
        }
    }
    if (!out[0] && lake__key_tenant(key, out, 256) != 0)
        out[0] = '\0';
}

static void settled_add(lake_exporter *ex, settled *d, const char *key)
{
    if (d->n == LAKE_MAX_OPEN || strlen(key) >= sizeof d->key[0])
        return;
    snprintf(d->key[d->n], sizeof d->key[0], "%s", key);
    object_tenant(ex, d->st, key, d->tenant[d->n]);
    d->n++;
}

static int recover_single(lake_exporter *ex, fm_lake_cursor *c, settled *done, fm_errbuf *err)
{
    if (pending_is_ours(ex, c) && access(c->pending_spool, F_OK) == 0) {
        int rc = fm_lake_put(ex->lake, c->pending_key, c->pending_spool, err);
        if (rc == 0)
            settled_add(ex, done, c->pending_key);
        return rc;
    }
    int ex_rc = ex->lake->vt->exists(ex->lake, c->pending_key);
    if (ex_rc < 0)
        return fm_errf(err, ex_rc, "lake: cannot check %s", c->pending_key);
    if (ex_rc == 0)
        rewind_cursor(c);
    else
        settled_add(ex, done, c->pending_key);
    return 0;
}

static int recover_manifest(lake_exporter *ex, fm_lake_cursor *c, settled *done,
                            fm_errbuf *err)
{
    char *text = NULL;
    int rc = pending_is_ours(ex, c) ? fm_read_file(c->pending_spool, &text, NULL)
                                    : FM_ENOTFOUND;
    if (rc == FM_ENOTFOUND) {
        /* The manifest is removed only after pending is cleared, so this
         * is the aborted-after-commit case: nothing of it was put. */
        rewind_cursor(c);
        return 0;
    }
    if (rc != 0)
        return fm_errf(err, rc, "lake: cannot read %s", c->pending_spool);
    for (char *line = text, *next; rc == 0 && line && *line; line = next) {
        next = strchr(line, '\n');
        if (next)
            *next++ = '\0';
        char *tab = strchr(line, '\t');
        if (!tab)
            continue;
        *tab = '\0';
        /* A missing spool file was renamed into the lake already. */
        if (access(tab + 1, F_OK) == 0)
            rc = fm_lake_put(ex->lake, line, tab + 1, err);
        if (rc == 0)
            settled_add(ex, done, line);
    }
    fm_free(text);
    return rc;
}

static int clean_spool(lake_exporter *ex)
{
    DIR *d = opendir(ex->lake->spool_dir);
    if (!d)
        return FM_EIO;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        /* Only the exporter's own files (<area>-<seq>…): others (a model
         * upload, `fleetml lake check`) may be in flight in the same dir. */
        bool mine = false;
        for (int i = 0; i < FM_STREAM_COUNT && !mine; i++) {
            size_t al = strlen(ex->s[i].area);
            mine = strncmp(de->d_name, ex->s[i].area, al) == 0 && de->d_name[al] == '-';
        }
        if (!mine)
            continue;
        if (unlinkat(dirfd(d), de->d_name, 0) == 0)
            fm_logf(FM_LOG_DEBUG, LAKE_COMPONENT, "removed stale spool file %s", de->d_name);
    }
    closedir(d);
    return 0;
}

/* The last seq surely in the lake by this cursor: its pending batch may not
 * have been put yet. */
static int64_t published_of(const fm_lake_cursor *c)
{
    int64_t first;
    if (c->pending_key[0] && lake__key_first_seq(c->pending_key, &first) == 0 && first > 0 &&
        first - 1 < c->last_seq)
        return first - 1;
    return c->last_seq;
}

/* A database exported before cursors were the cluster's has the cursor
 * under this node's id: the cluster takes it over once, when it has none. */
static int adopt_cursor(lake_exporter *ex, lake_stream *s, fm_lake_cursor *c, fm_errbuf *err)
{
    fm_lake_cursor mine;
    memset(&mine, 0, sizeof mine);
    int rc = fm_store_lake_cursor_get(ex->store, ex->cfg.node_id, s->st, &mine);
    if (rc != 0)
        return fm_errf(err, rc, "lake: cannot read the %s cursor", s->area);
    if (mine.last_seq == 0 && !mine.pending_key[0])
        return 0;
    if ((rc = lease_check(ex, true, err)) != 0 ||
        (rc = fm_store_lake_cursor_set(ex->store, FM_LAKE_CURSOR_OWNER, s->st, &mine, err)) != 0)
        return rc;
    fm_logf(FM_LOG_INFO, LAKE_COMPONENT,
            "the %s cursor of node %s (%" PRId64 ") is now the cluster's", s->area,
            ex->cfg.node_id, mine.last_seq);
    *c = mine;
    return 0;
}

/* Loads every stream's cursor, settles a half-published batch, and removes
 * stale spool files. Must run before any export and again after any failure,
 * because a failure can leave the in-memory state behind the store's. */
static int recover(lake_exporter *ex, fm_errbuf *err)
{
    for (int i = 0; i < FM_STREAM_COUNT; i++)
        batch_abort(&ex->s[i]);
    for (int i = 0; i < FM_STREAM_COUNT; i++) {
        lake_stream *s = &ex->s[i];
        fm_lake_cursor c;
        memset(&c, 0, sizeof c);
        int rc = fm_store_lake_cursor_get(ex->store, FM_LAKE_CURSOR_OWNER, s->st, &c);
        if (rc != 0)
            return fm_errf(err, rc, "lake: cannot read the %s cursor", s->area);
        if (c.last_seq == 0 && !c.pending_key[0] && (rc = adopt_cursor(ex, s, &c, err)) != 0)
            return rc;
        s->published = published_of(&c);
        if (c.pending_key[0]) {
            bool man = is_manifest(c.pending_spool), ours = pending_is_ours(ex, &c);
            settled done = {.n = 0, .st = s->st};
            rc = man ? recover_manifest(ex, &c, &done, err) : recover_single(ex, &c, &done, err);
            if (rc == 0)
                rc = lease_check(ex, true, err);
            if (rc != 0)
                return rc;
            char spool[sizeof c.pending_spool];
            memcpy(spool, c.pending_spool, sizeof spool);
            c.pending_key[0] = c.pending_spool[0] = '\0';
            fm_lake_object objs[LAKE_MAX_OPEN];
            for (int k = 0; k < done.n; k++)
                objs[k] = (fm_lake_object){.tenant = done.tenant[k], .area = s->area,
                                           .key = done.key[k], .rows = -1};
            if ((rc = fm_store_lake_settle(ex->store, FM_LAKE_CURSOR_OWNER, s->st, &c, objs,
                                           (size_t)done.n, err)) != 0)
                return rc;
            if (man && ours)
                unlink(spool);
            fm_logf(FM_LOG_INFO, LAKE_COMPONENT, "recovered pending %s object, cursor %" PRId64,
                    s->area, c.last_seq);
        }
        s->cursor = s->pos = s->published = c.last_seq;
    }
    if (clean_spool(ex) != 0)
        return fm_errf(err, FM_EIO, "lake: cannot list %s", ex->lake->spool_dir);
    ex->recovered = true;
    return 0;
}

/* ---- exporter lifecycle -------------------------------------------------- */

static void ex_init(lake_exporter *ex, const fm_config *cfg)
{
    memset(ex, 0, sizeof *ex);
    ex->cfg = *cfg;
    ex->lock_fd = -1;
    ex->roll.roll_bytes = cfg->lake_roll_bytes;
    ex->roll.roll_ms = (int64_t)cfg->lake_roll_seconds * 1000;
    /* Exported in this order; each stream has its own cursor and area. */
    static const char *const areas[FM_STREAM_COUNT] = {
        [FM_STREAM_RAW] = "raw",
        [FM_STREAM_QUARANTINE] = "quarantine",
        [FM_STREAM_LABELS] = "labels",
        [FM_STREAM_AUDIT] = "logs",
    };
    for (int i = 0; i < FM_STREAM_COUNT; i++) {
        ex->s[i].st = (enum fm_lake_stream)i;
        ex->s[i].area = areas[i];
    }
}

/* Opens what is not open yet: store handle, backend, exclusive lock. */
static int ex_open(lake_exporter *ex, fm_errbuf *err)
{
    int rc;
    if (!ex->store && (rc = fm_store_open(&ex->cfg, &ex->store, err)) != 0)
        return rc;
    if (!ex->lake && (rc = fm_lake_open(&ex->cfg, &ex->lake, err)) != 0)
        return rc;
    /* Level 1: the lake is written beside the hot path on the same cores;
     * the fastest level still shrinks sweep JSON several times. */
    if (!ex->deflate && !(ex->deflate = libdeflate_alloc_compressor(1)))
        return fm_errf(err, FM_ENOMEM, "lake: cannot allocate the gzip compressor");
    if (ex->lock_fd < 0) {
        char path[PATH_MAX];
        if (snprintf(path, sizeof path, "%s/%s", ex->lake->spool_dir, LAKE_LOCK_NAME) >=
            (int)sizeof path)
            return fm_errf(err, FM_EINVAL, "lake: spool path too long");
        int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0)
            return fm_errf(err, io_code(errno), "lake: cannot open %s: %s", path,
                           strerror(errno));
        if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
            close(fd);
            return fm_errf(err, FM_EBUSY, "lake: another exporter is running on %s",
                           ex->lake->spool_dir);
        }
        ex->lock_fd = fd;
    }
    return 0;
}

/* The cluster's backlog, on every node: a node standing by reads the
 * cursors the holder keeps in the store. */
static void update_backlog(lake_exporter *ex)
{
    int64_t backlog = 0;
    for (int i = 0; i < FM_STREAM_COUNT; i++) {
        int64_t max = 0, cursor = ex->s[i].published;
        fm_lake_cursor c;
        if (ex->store && !ex->lease_until &&
            fm_store_lake_cursor_get(ex->store, FM_LAKE_CURSOR_OWNER, ex->s[i].st, &c) == 0)
            cursor = published_of(&c);
        if (ex->store && fm_store_max_seq(ex->store, ex->s[i].st, &max) == 0 && max > cursor)
            backlog += max - cursor;
    }
    atomic_store(&fm_metrics_get()->lake_backlog, backlog);
}

/* One export pass. On failure every open batch is dropped and the next
 * pass starts with recovery, so the store's cursor is the truth. */
static int ex_run(lake_exporter *ex, bool force, fm_errbuf *err)
{
    int rc = ex_open(ex, err);
    if (rc == 0)
        rc = lease_check(ex, false, err);
    if (rc == 0 && !ex->recovered)
        rc = recover(ex, err);
    for (int i = 0; i < FM_STREAM_COUNT && rc == 0; i++)
        rc = export_stream(ex, &ex->s[i], force, err);
    if (rc != 0) {
        ex->recovered = false;
        if (ex->lake)
            for (int i = 0; i < FM_STREAM_COUNT; i++)
                batch_abort(&ex->s[i]);
        if (!ex->standby)
            atomic_fetch_add(&fm_metrics_get()->lake_errors, 1);
    }
    update_backlog(ex);
    /* Standing by for another node's export is not a failure. */
    if (ex->standby)
        return rc;
    /* Log transitions, not every retry: a full disk would otherwise flood
     * the log every backoff period. */
    if (rc != 0 && rc != ex->last_rc)
        fm_logf(FM_LOG_ERROR, LAKE_COMPONENT, "lake export failing: %s", err->msg);
    else if (rc == 0 && ex->last_rc != 0)
        fm_logf(FM_LOG_INFO, LAKE_COMPONENT, "lake export recovered");
    ex->last_rc = rc;
    return rc;
}

static void ex_close(lake_exporter *ex)
{
    if (ex->lake)
        for (int i = 0; i < FM_STREAM_COUNT; i++)
            batch_abort(&ex->s[i]);
    /* Handing the lease back lets another node take over at once instead
     * of after FM_LAKE_LEASE_MS. */
    if (ex->lease_until && ex->store &&
        fm_store_lease(ex->store, FM_LAKE_LEASE, ex->cfg.node_id, 0, NULL, 0) != 0)
        fm_logf(FM_LOG_WARN, LAKE_COMPONENT, "cannot release the lake export lease");
    if (ex->lease_until)
        atomic_store(&fm_metrics_get()->lake_lease_held, 0);
    ex->lease_until = 0;
    if (ex->lock_fd >= 0)
        close(ex->lock_fd); /* releases the flock */
    fm_lake_close(ex->lake);
    fm_store_close(ex->store);
    fm_free(ex->line);
    fm_free(ex->member);
    libdeflate_free_compressor(ex->deflate);
    ex->deflate = NULL;
    ex->member = NULL;
    ex->member_cap = 0;
    ex->lock_fd = -1;
    ex->lake = NULL;
    ex->store = NULL;
    ex->line = NULL;
}

int fm_lake_export_all(const fm_config *cfg, fm_errbuf *err)
{
    lake_exporter *ex = fm_malloc(sizeof *ex); /* large: keep it off the stack */
    if (!ex)
        return fm_errf(err, FM_ENOMEM, "lake: out of memory");
    ex_init(ex, cfg);
    int rc = ex_run(ex, true, err);
    ex_close(ex);
    fm_free(ex);
    return rc;
}

/* ---- writer thread ------------------------------------------------------- */

struct fm_lake_writer {
    lake_exporter ex;
    fm_thread thread;    /* its lock guards the fields below; it waits on its cv */
    pthread_cond_t done; /* flush callers wait here */
    bool notified;
    uint64_t flush_req, flush_done;
    int flush_rc;
};

static void *writer_main(void *arg)
{
    fm_lake_writer *w = arg;
    /* The lake is asynchronous by design: when the CPU is contended the
     * pipeline's threads (whose latency devices see) go first, and the
     * export catches up in the gaps (its backlog is a metric). */
    if (setpriority(PRIO_PROCESS, (id_t)gettid(), LAKE_NICE) != 0)
        fm_logf(FM_LOG_DEBUG, LAKE_COMPONENT, "cannot lower the lake writer's priority");
    int64_t backoff = 0, next_try = 0;
    fm_thread_lock(&w->thread);
    for (;;) {
        /* Runs at most once a tick (or at once for a flush or stop): a
         * run per commit would spend more on waking up, preparing the scan
         * and starting gzip blocks than on exporting rows. */
        if (!fm_thread_should_stop(&w->thread) && w->flush_req == w->flush_done)
            fm_thread_wait_ns(&w->thread, LAKE_TICK_MS * 1000000LL);
        bool stop = fm_thread_should_stop(&w->thread);
        uint64_t req = w->flush_req;
        bool force = stop || req != w->flush_done;
        w->notified = false;
        fm_thread_unlock(&w->thread);

        /* While backing off after an error only explicit flushes (and the
         * final one at stop) try again: retrying at every commit would turn
         * a full disk into a busy loop. */
        int rc = 0;
        int64_t now = mono_ms();
        if (force || now >= next_try) {
            fm_errbuf err = {{0}};
            rc = ex_run(&w->ex, force, &err);
            if (rc != 0) {
                backoff = backoff ? backoff * 2 : LAKE_TICK_MS;
                if (backoff > LAKE_BACKOFF_MAX_MS)
                    backoff = LAKE_BACKOFF_MAX_MS;
                next_try = mono_ms() + backoff;
            } else {
                backoff = 0;
                next_try = 0;
            }
        }

        fm_thread_lock(&w->thread);
        if (force && req != w->flush_done) {
            w->flush_done = req;
            w->flush_rc = rc;
            pthread_cond_broadcast(&w->done);
        }
        if (stop)
            break;
    }
    fm_thread_unlock(&w->thread);
    return NULL;
}

int fm_lake_writer_start(const fm_config *cfg, fm_lake_writer **out, fm_errbuf *err)
{
    *out = NULL;
    fm_lake_writer *w = fm_calloc(1, sizeof *w);
    if (!w)
        return fm_errf(err, FM_ENOMEM, "lake: out of memory");
    ex_init(&w->ex, cfg);
    /* The store and the backend configuration are checked now so a broken
     * setup fails start-up; an unwritable lake or a held lock is not fatal:
     * the thread retries, because the pipeline must not wait for the lake. */
    int rc = ex_open(&w->ex, err);
    if (rc == 0)
        rc = lease_check(&w->ex, false, err);
    if (rc == 0)
        rc = recover(&w->ex, err);
    else if (w->ex.standby)
        rc = 0; /* another node exports; this one takes over if it stops */
    if (rc == FM_EINVAL || rc == FM_EUNAVAIL || (rc != 0 && !w->ex.store)) {
        ex_close(&w->ex);
        fm_free(w);
        return rc;
    }
    if (rc != 0) {
        fm_logf(FM_LOG_ERROR, LAKE_COMPONENT, "lake export failing: %s", err->msg);
        w->ex.last_rc = rc;
        atomic_fetch_add(&fm_metrics_get()->lake_errors, 1);
    }
    pthread_cond_init(&w->done, NULL);
    if (fm_thread_start(&w->thread, "fm-lake", writer_main, w) != 0) {
        pthread_cond_destroy(&w->done);
        ex_close(&w->ex);
        fm_free(w);
        return fm_errf(err, FM_ENOMEM, "lake: cannot start the writer thread");
    }
    *out = w;
    return 0;
}

void fm_lake_writer_notify(fm_lake_writer *w)
{
    if (!w)
        return;
    /* Only records that there is work; the thread picks it up at its next
     * tick (see writer_main). */
    fm_thread_lock(&w->thread);
    w->notified = true;
    fm_thread_unlock(&w->thread);
}

int fm_lake_writer_flush(fm_lake_writer *w)
{
    if (!w)
        return FM_EINVAL;
    fm_thread_lock(&w->thread);
    uint64_t my = ++w->flush_req;
    fm_thread_wake(&w->thread);
    while (w->flush_done < my)
        pthread_cond_wait(&w->done, &w->thread.mu);
    int rc = w->flush_rc;
    fm_thread_unlock(&w->thread);
    return rc;
}

void fm_lake_writer_stop(fm_lake_writer *w)
{
    if (!w)
        return;
    fm_thread_stop(&w->thread); /* the last pass runs with force: a flush */
    pthread_cond_destroy(&w->done);
    ex_close(&w->ex);
    fm_free(w);
}
