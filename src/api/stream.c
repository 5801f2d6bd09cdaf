/*
 * Live views for the dashboard, as Server-Sent Events (text/event-stream):
 *   GET /api/v1/devices/{id}/events  the device's measurements as they are
 *                                     committed, by this node or any other
 *                                     sharing the store;
 *   GET /api/v1/fleet/events          the tenant's devices going online and
 *                                     offline (presence changes, by rev).
 *
 * One pump thread per node reads the records committed after its position
 * (fm_store_scan_records, the lake exporter's ordered scan) every
 * STREAM_POLL_MS while at least one stream is open, and appends an event to
 * each stream of that record's device. A stream with nothing to send
 * suspends its connection from libmicrohttpd's content-reader callback, so
 * no thread waits on a quiet stream; the pump resumes it when it appends.
 * Every STREAM_KEEPALIVE_MS the pump sends a comment to every stream, which
 * keeps proxies from closing it and lets libmicrohttpd notice a client that
 * has gone. A stream ends when its access token expires (the page opens a
 * new one with a fresh token), so a disabled user or a revoked session does
 * not keep watching.
 *
 * The same pump reads presence changes after the lowest rev a fleet stream
 * has seen (fm_store_presence_changes) and appends each to the fleet
 * streams of the device's tenant (every tenant's for an operator).
 *
 * Events of a device stream:
 *   event: ready        data: {"device": id}            once, at the start
 *   event: measurement  data: <MeasurementSummary>       each new measurement
 * Events of a fleet stream:
 *   event: ready        data: {"tenant": t|null}        once, at the start
 *   event: presence     data: {"device", "online", "changed_at"}
 */
#include "api/api_int.h"

#include <string.h>

#define STREAM_POLL_MS 250
#define STREAM_KEEPALIVE_MS 10000
#define STREAM_SCAN 256
#define STREAM_BUF_MAX (4 << 20) /* a client this far behind is cut off */

struct api_stream {
    api_stream *next;
    fm_http *h;
    struct MHD_Connection *conn;
    bool fleet;         /* a fleet stream (presence) rather than a device's */
    char device[72];    /* device stream: its device */
    char tenant[72];    /* fleet stream: its tenant ("" = every tenant) */
    int64_t expires_ms; /* the access token's expiry */
    int64_t seen;       /* newest record seq (device) or presence rev (fleet) offered */
    char *buf;
    size_t len, off, cap;
    bool suspended;
    bool done; /* end of stream once the buffer is sent */
};

/* With streams_mu held. Appends text; a stream too far behind is ended. */
static void stream_put(api_stream *s, const char *text, size_t n)
{
    if (s->done)
        return;
    if (s->off > 0 && s->off == s->len)
        s->off = s->len = 0;
    if (s->len + n > STREAM_BUF_MAX) {
        s->done = true;
        return;
    }
    if (s->len + n > s->cap) {
        size_t cap = s->cap ? s->cap : 4096;
        while (cap < s->len + n)
            cap *= 2;
        char *nb = fm_realloc(s->buf, cap);
        if (!nb) {
            s->done = true;
            return;
        }
        s->buf = nb;
        s->cap = cap;
    }
    memcpy(s->buf + s->len, text, n);
    s->len += n;
}

/* With streams_mu held: lets libmicrohttpd call the reader again. */
static void stream_wake(api_stream *s)
{
    if (s->suspended) {
        s->suspended = false;
        MHD_resume_connection(s->conn);
    }
}

static ssize_t stream_read(void *cls, uint64_t pos, char *out, size_t max)
{
    api_stream *s = cls;
    fm_http *h = s->h;
    (void)pos;
    ssize_t n;
    pthread_mutex_lock(&h->streams_mu);
    if (s->off < s->len) {
        size_t k = s->len - s->off < max ? s->len - s->off : max;
        memcpy(out, s->buf + s->off, k);
        s->off += k;
        n = (ssize_t)k;
    } else if (s->done || h->streams_stopping) {
        n = MHD_CONTENT_READER_END_OF_STREAM;
    } else {
        /* Nothing to send: off the event loop until the pump has some. */
        MHD_suspend_connection(s->conn);
        s->suspended = true;
        n = 0;
    }
    pthread_mutex_unlock(&h->streams_mu);
    return n;
}

static void stream_free(void *cls)
{
    api_stream *s = cls;
    fm_http *h = s->h;
    pthread_mutex_lock(&h->streams_mu);
    for (api_stream **p = &h->streams; *p; p = &(*p)->next)
        if (*p == s) {
            *p = s->next;
            break;
        }
    pthread_mutex_unlock(&h->streams_mu);
    fm_free(s->buf);
    fm_free(s);
}

/* ---- the pump ---------------------------------------------------------------- */

typedef struct pump_ctx {
    fm_http *h;
    int64_t seq;
} pump_ctx;

/* The text of one Server-Sent Event "event: <name>\ndata: <doc>\n\n"
 * (fm_malloc'd; NULL when out of memory). Takes doc (may be NULL). */
static char *sse_event(const char *name, json_t *doc)
{
    char *j = doc ? json_dumps(doc, JSON_COMPACT | JSON_PRESERVE_ORDER |
                                        JSON_REAL_PRECISION(15))
                  : NULL;
    json_decref(doc);
    if (!j)
        return NULL;
    size_t n = strlen(j) + strlen(name) + 20;
    char *text = fm_malloc(n);
    if (text)
        snprintf(text, n, "event: %s\ndata: %s\n\n", name, j);
    free(j);
    return text;
}

/* Offers a record to every stream that has not seen it yet; streams of its
 * device get the event. */
static int on_record(void *ud, const fm_record *rec)
{
    pump_ctx *p = ud;
    fm_http *h = p->h;
    p->seq = rec->seq;
    char *text = NULL;
    pthread_mutex_lock(&h->streams_mu);
    for (api_stream *s = h->streams; s; s = s->next) {
        if (s->fleet || rec->seq <= s->seen)
            continue;
        s->seen = rec->seq;
        if (strcmp(s->device, rec->device_id) != 0)
            continue;
        if (!text && !(text = sse_event("measurement", api_record_json(rec, false))))
            break;
        stream_put(s, text, strlen(text));
        stream_wake(s);
    }
    pthread_mutex_unlock(&h->streams_mu);
    fm_free(text);
    return 0;
}

/* Offers a presence change to every fleet stream that has not seen it;
 * those of the device's tenant (or of every tenant) get the event. */
static int on_presence(void *ud, const fm_presence_change *c)
{
    pump_ctx *p = ud;
    fm_http *h = p->h;
    p->seq = c->rev;
    char *text = NULL;
    pthread_mutex_lock(&h->streams_mu);
    for (api_stream *s = h->streams; s; s = s->next) {
        if (!s->fleet || c->rev <= s->seen)
            continue;
        s->seen = c->rev;
        if (s->tenant[0] && strcmp(s->tenant, c->tenant) != 0)
            continue;
        if (!text &&
            !(text = sse_event("presence",
                               json_pack("{s:s,s:s,s:b,s:o}", "device", c->device_id, "tenant",
                                         c->tenant, "online", c->online, "changed_at",
                                         fm_json_time(c->changed_ms)))))
            break;
        stream_put(s, text, strlen(text));
        stream_wake(s);
    }
    pthread_mutex_unlock(&h->streams_mu);
    fm_free(text);
    return 0;
}

/* Catches up one kind of stream from its lowest position: a burst is read
 * STREAM_SCAN rows at a time, then the pump yields. */
static void pump_scan(fm_http *h, pump_ctx *p, bool fleet, int64_t low)
{
    p->seq = low;
    for (int i = 0; i < 64; i++) {
        int64_t before = p->seq;
        int rc = fleet ? fm_store_presence_changes(h->pump_store, p->seq, STREAM_SCAN,
                                                   on_presence, p)
                       : fm_store_scan_records(h->pump_store, p->seq, STREAM_SCAN, on_record, p);
        if (rc != 0 || p->seq - before < STREAM_SCAN)
            break;
    }
}

static void *pump_main(void *arg)
{
    fm_http *h = arg;
    pump_ctx p = {.h = h};
    int64_t next_keepalive = 0;
    fm_thread_lock(&h->pump);
    while (!fm_thread_should_stop(&h->pump)) {
        fm_thread_wait_ns(&h->pump, (int64_t)STREAM_POLL_MS * 1000000);
        if (fm_thread_should_stop(&h->pump))
            break;
        fm_thread_unlock(&h->pump);
        int64_t now = fm_wall_ms();
        pthread_mutex_lock(&h->streams_mu);
        bool keepalive = h->streams != NULL && now >= next_keepalive;
        /* From the stream that has seen least: each was positioned when it
         * opened, so none misses what was committed just after. */
        int64_t low = INT64_MAX, low_fleet = INT64_MAX;
        for (api_stream *s = h->streams; s; s = s->next) {
            int64_t *l = s->fleet ? &low_fleet : &low;
            if (s->seen < *l)
                *l = s->seen;
            if (keepalive)
                stream_put(s, ":\n\n", 3);
            if (now >= s->expires_ms)
                s->done = true;
            if (keepalive || s->done)
                stream_wake(s);
        }
        pthread_mutex_unlock(&h->streams_mu);
        if (keepalive)
            next_keepalive = now + STREAM_KEEPALIVE_MS;
        if (low != INT64_MAX)
            pump_scan(h, &p, false, low);
        if (low_fleet != INT64_MAX)
            pump_scan(h, &p, true, low_fleet);
        fm_thread_lock(&h->pump);
    }
    fm_thread_unlock(&h->pump);
    return NULL;
}

int api_streams_start(fm_http *h, fm_errbuf *err)
{
    int rc = fm_store_open(&h->cfg, &h->pump_store, err);
    if (rc)
        return rc;
    if (fm_thread_start(&h->pump, "fm-stream", pump_main, h) != 0)
        return fm_errf(err, FM_ENOMEM, "cannot start the stream thread");
    h->pump_started = true;
    return 0;
}

void api_streams_stop(fm_http *h)
{
    if (h->pump_started) {
        fm_thread_stop(&h->pump);
        h->pump_started = false;
    }
    pthread_mutex_lock(&h->streams_mu);
    h->streams_stopping = true;
    for (api_stream *s = h->streams; s; s = s->next)
        stream_wake(s); /* a suspended connection must be resumed to end */
    pthread_mutex_unlock(&h->streams_mu);
}

/* Sets r->stream to a new stream positioned at the store's present (seq
 * or rev from fm_store_max_seq / fm_store_presence_rev): everything
 * committed from now on is its. hello (taken) is its first event's data. */
static void stream_open(api_req *r, api_stream *s, json_t *hello)
{
    s->h = r->h;
    s->conn = r->conn;
    int rc = s->fleet ? fm_store_presence_rev(r->store, &s->seen)
                      : fm_store_max_seq(r->store, FM_STREAM_RAW, &s->seen);
    if (rc != 0) {
        json_decref(hello);
        fm_free(s);
        api_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "unavailable", "the store is unavailable");
        return;
    }
    s->expires_ms = r->who.exp > 0 ? r->who.exp * 1000 : r->now_ms + 15 * 60 * 1000;
    char *j = hello ? json_dumps(hello, JSON_COMPACT) : NULL;
    json_decref(hello);
    char text[256];
    int n = snprintf(text, sizeof text, "retry: 2000\nevent: ready\ndata: %s\n\n", j ? j : "{}");
    free(j);
    stream_put(s, text, (size_t)n < sizeof text ? (size_t)n : sizeof text - 1);
    r->stream = s;
    r->status = MHD_HTTP_OK;
}

void api_stream_open(api_req *r, const char *device_id)
{
    api_stream *s = fm_calloc(1, sizeof *s);
    if (!s) {
        api_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "unavailable", "out of memory");
        return;
    }
    snprintf(s->device, sizeof s->device, "%s", device_id);
    stream_open(r, s, json_pack("{s:s}", "device", s->device));
}

void api_fleet_stream_open(api_req *r, const char *tenant)
{
    api_stream *s = fm_calloc(1, sizeof *s);
    if (!s) {
        api_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "unavailable", "out of memory");
        return;
    }
    s->fleet = true;
    snprintf(s->tenant, sizeof s->tenant, "%s", tenant ? tenant : "");
    stream_open(r, s, json_pack("{s:o}", "tenant", tenant ? json_string(tenant) : json_null()));
}

enum MHD_Result api_stream_answer(api_req *r)
{
    api_stream *s = r->stream;
    fm_http *h = r->h;
    struct MHD_Response *resp =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, stream_read, s, stream_free);
    if (!resp) {
        fm_free(s->buf);
        fm_free(s);
        return MHD_NO;
    }
    MHD_add_response_header(resp, "Content-Type", "text/event-stream; charset=utf-8");
    MHD_add_response_header(resp, "X-Accel-Buffering", "no"); /* proxies: do not hold it */
    api_security_headers(h, resp, "no-store", API_CSP);
    pthread_mutex_lock(&h->streams_mu);
    bool stopping = h->streams_stopping;
    if (!stopping) {
        s->next = h->streams;
        h->streams = s;
    }
    pthread_mutex_unlock(&h->streams_mu);
    enum MHD_Result ret = MHD_queue_response(r->conn, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp); /* stream_free runs when the connection is done */
    return ret;
}
