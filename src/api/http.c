/*
 * The HTTP listeners: libmicrohttpd with a thread pool, request bodies
 * bounded per route, one store handle per request from a pool, bearer
 * token checks and the central permission check, then the route's handler
 * (v1_*.c).
 *
 * The edge (docs/operations.md, "The HTTP edge"): every request head is
 * checked for unambiguous framing and a clean target before routing
 * (edge.c), routes match the path as sent, a connection that sends its
 * head or body too slowly is cut by the edge thread, and the per-address
 * cap counts connections, or requests per forwarded address behind a
 * trusted proxy.
 *
 * Two listeners: the API (http.bind:port: /api/v1/... and a bare /healthz
 * for load balancers) and operations (ops.bind:port, loopback by default:
 * /healthz with details, /readyz, /metrics, /openapi.yaml and, only with
 * FM_FAULT_INJECTION=1, /debug/fault).
 */
#include "api/api_int.h"
#include "api/web.h"
#include "fleetml/fault.h"
#include "fleetml/metrics.h"

#include <arpa/inet.h>
#include <stdarg.h>
#include <sys/socket.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

extern const unsigned char fm_openapi_yaml[];
extern const unsigned long fm_openapi_yaml_len;


#define HOUSEKEEPING_MS (5 * 60 * 1000)
#define PATH_MAX_SENT 1024       /* longer request paths: 414 */
#define BODY_GRACE_NS (5ull * 1000000000ull)
#define EDGE_TICK_NS (250ll * 1000000ll)

/* Per-request state kept by libmicrohttpd between calls; created when the
 * request line arrives (uri_seen), freed by completed(). */
typedef struct conn_state {
    char path[PATH_MAX_SENT]; /* the path as sent (no query) */
    int target_rc;          /* fm_http_target_path's verdict */
    bool started;           /* the first handler call (head complete) happened */
    const api_route *route; /* resolved on the first call (NULL: none) */
    char params[API_MAX_PARAMS][160]; /* its path parameters */
    char allow[96];         /* when no route: the methods the path has */
    bool path_known, bad_param;
    char *body;
    size_t len, max;
    bool too_large;
    char counted[64];       /* behind a proxy: the forwarded address counted in flight */
} conn_state;

/* What a connection is waiting for, for the edge thread's deadlines. */
enum { PHASE_HEAD, PHASE_BODY, PHASE_ANSWER };

/* One open connection (libmicrohttpd's socket context), listed under
 * h->edge's lock. */
typedef struct conn_track {
    struct conn_track *prev, *next;
    int fd;
    int phase;
    uint64_t since_ns; /* start of the phase */
    uint64_t body_got; /* body bytes received in PHASE_BODY */
    bool cut;          /* shut down by the edge thread */
} conn_track;

/* Requests in flight from one forwarded client address (behind a proxy). */
typedef struct addr_count {
    char addr[64];
    unsigned n;
} addr_count;

/* ---- store pool ---------------------------------------------------------- */

static int pool_open(api_store_pool *p, const fm_config *cfg, size_t n, fm_errbuf *err)
{
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->free = fm_calloc(n, sizeof *p->free);
    if (!p->free)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    p->cap = n;
    for (size_t i = 0; i < n; i++) {
        int rc = fm_store_open(cfg, &p->free[i], err);
        if (rc)
            return rc;
        p->nfree++;
    }
    return 0;
}

static fm_store *pool_take(api_store_pool *p)
{
    pthread_mutex_lock(&p->mu);
    while (p->nfree == 0)
        pthread_cond_wait(&p->cv, &p->mu);
    fm_store *s = p->free[--p->nfree];
    pthread_mutex_unlock(&p->mu);
    return s;
}

static void pool_give(api_store_pool *p, fm_store *s)
{
    pthread_mutex_lock(&p->mu);
    p->free[p->nfree++] = s;
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

static void pool_close(api_store_pool *p)
{
    if (!p->free)
        return;
    for (size_t i = 0; i < p->nfree; i++)
        fm_store_close(p->free[i]);
    fm_free(p->free);
    p->free = NULL;
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
}

/* ---- answers ---------------------------------------------------------------- */

void api_json(api_req *r, unsigned status, json_t *doc)
{
    json_decref(r->out);
    r->out = doc;
    r->status = doc ? status : MHD_HTTP_INTERNAL_SERVER_ERROR;
}

void api_error(api_req *r, unsigned status, const char *code, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    api_json(r, status, json_pack("{s:{s:s,s:s}}", "error", "code", code, "message", msg));
}

void api_store_error(api_req *r, int rc)
{
    if (rc == FM_EBUSY || rc == FM_ENOSPC || rc == FM_EIO || rc == FM_EUNAVAIL) {
        r->retry_after = 1;
        api_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "unavailable",
                  "the store is unavailable, retry later");
    } else {
        api_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "internal error");
    }
}

void api_no_content(api_req *r)
{
    json_decref(r->out);
    r->out = NULL;
    r->status = MHD_HTTP_NO_CONTENT;
}

void api_security_headers(const fm_http *h, struct MHD_Response *resp, const char *cache,
                          const char *csp)
{
    MHD_add_response_header(resp, "Cache-Control", cache);
    MHD_add_response_header(resp, "X-Content-Type-Options", "nosniff");
    MHD_add_response_header(resp, "X-Frame-Options", "DENY");
    MHD_add_response_header(resp, "Content-Security-Policy", csp);
    MHD_add_response_header(resp, "Referrer-Policy", "no-referrer");
    if (h->tls)
        MHD_add_response_header(resp, "Strict-Transport-Security", "max-age=31536000");
}

static enum MHD_Result send_buffer(fm_http *h, struct MHD_Connection *conn, unsigned status,
                                   const char *type, char *body, size_t len, const api_req *r)
{
    if (!body)
        return MHD_NO;
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        fm_free(body);
        return MHD_NO;
    }
    if (type)
        MHD_add_response_header(resp, "Content-Type", type);
    api_security_headers(h, resp, "no-store", API_CSP);
    if (r) {
        char ra[24];
        if (r->retry_after > 0) {
            snprintf(ra, sizeof ra, "%ld", r->retry_after);
            MHD_add_response_header(resp, "Retry-After", ra);
        }
        if (r->allow)
            MHD_add_response_header(resp, "Allow", r->allow);
        if (r->www_authenticate)
            MHD_add_response_header(resp, "WWW-Authenticate", "Bearer realm=\"fleetml\"");
        if (r->close)
            MHD_add_response_header(resp, "Connection", "close");
    }
    enum MHD_Result ret = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

static enum MHD_Result send_json(fm_http *h, struct MHD_Connection *conn, unsigned status,
                                 json_t *doc, const api_req *r)
{
    /* 15 significant digits: stored documents re-parsed for a response
     * print as they were sent (37.21, not 37.210000000000001); the lake
     * keeps the raw text for anyone who needs every bit. */
    char *s = doc ? json_dumps(doc, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(15))
                  : NULL;
    json_decref(doc);
    if (!s)
        return MHD_NO;
    return send_buffer(h, conn, status, "application/json", s, strlen(s), r);
}

static enum MHD_Result send_error(fm_http *h, struct MHD_Connection *conn, unsigned status,
                                  const char *code, const char *message, const api_req *r)
{
    return send_json(h, conn, status,
                     json_pack("{s:{s:s,s:s}}", "error", "code", code, "message", message), r);
}

/* ---- small helpers for handlers ------------------------------------------- */

const char *api_query(api_req *r, const char *name)
{
    return MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, name);
}

bool api_scope_tenant(api_req *r, const char **tenant)
{
    const char *t = api_query(r, "tenant");
    *tenant = r->who.tenant;
    if (!t || strcmp(t, r->who.tenant) == 0)
        return true;
    if (!(r->who.role_mask & FM_ROLE_OPERATOR)) {
        /* Naming another tenant is not a way to learn it exists. */
        api_error(r, MHD_HTTP_NOT_FOUND, "not_found", "no such tenant");
        return false;
    }
    int ex = fm_store_tenant_exists(r->store, t);
    if (ex < 0) {
        api_store_error(r, ex);
        return false;
    }
    if (ex == 0) {
        api_error(r, MHD_HTTP_NOT_FOUND, "not_found", "no such tenant");
        return false;
    }
    *tenant = t;
    return true;
}

bool api_device_visible(api_req *r, const char *id, fm_device *out)
{
    int rc = fm_store_device_get(r->store, id, out);
    if (rc == 0 && !fm_auth_tenant_allowed(&r->who, out->tenant))
        rc = FM_ENOTFOUND;
    if (rc == FM_ENOTFOUND) {
        api_error(r, MHD_HTTP_NOT_FOUND, "not_found", "no such device");
        return false;
    }
    if (rc) {
        api_store_error(r, rc);
        return false;
    }
    return true;
}

bool api_page_args(api_req *r, size_t *limit, int64_t *ca, int64_t *cb, char *cs, size_t cs_len)
{
    *limit = API_PAGE_DEFAULT;
    *ca = *cb = 0;
    if (cs_len)
        cs[0] = '\0';
    const char *l = api_query(r, "limit");
    if (l) {
        char *end;
        long v = strtol(l, &end, 10);
        if (*l == '\0' || *end != '\0' || v < 1 || v > API_PAGE_MAX) {
            api_error(r, MHD_HTTP_BAD_REQUEST, "invalid_request",
                      "limit must be an integer from 1 to %d", API_PAGE_MAX);
            return false;
        }
        *limit = (size_t)v;
    }
    const char *c = api_query(r, "cursor");
    if (c && fm_api_cursor_decode(c, ca, cb, cs, cs_len) != 0) {
        api_error(r, MHD_HTTP_BAD_REQUEST, "invalid_request", "cursor is not valid");
        return false;
    }
    return true;
}

bool api_time_arg(api_req *r, const char *name, int64_t *out)
{
    *out = 0;
    const char *v = api_query(r, name);
    if (!v)
        return true;
    char *end;
    long long ms = strtoll(v, &end, 10);
    if (*v && *end == '\0' && ms >= 0) {
        *out = ms;
        return true;
    }
    int64_t t;
    if (fm_rfc3339_parse(v, &t) == 0 && t >= 0) {
        *out = t;
        return true;
    }
    api_error(r, MHD_HTTP_BAD_REQUEST, "invalid_request",
              "%s must be an RFC 3339 time or milliseconds since the epoch", name);
    return false;
}

bool api_page_more(json_t *items, size_t limit)
{
    if (json_array_size(items) <= limit)
        return false;
    json_array_remove(items, limit);
    return true;
}

void api_page_more_by_name(json_t *items, size_t limit, const char *field, char *next,
                           size_t next_len)
{
    next[0] = '\0';
    if (!api_page_more(items, limit))
        return;
    json_t *last = json_array_get(items, limit - 1);
    fm_api_cursor_encode(0, 0, json_string_value(json_object_get(last, field)), next, next_len);
}

void api_page_answer(api_req *r, int rc, json_t *items, const char *next_cursor)
{
    if (rc) {
        json_decref(items);
        api_store_error(r, rc);
        return;
    }
    api_json(r, 200,
             json_pack("{s:o,s:o}", "items", items, "next_cursor",
                       next_cursor && *next_cursor ? json_string(next_cursor) : json_null()));
}

void api_audit(api_req *r, const char *tenant, const char *action, const char *target,
               const char *outcome, json_t *details)
{
    char *dj = details ? json_dumps(details, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    json_decref(details);
    fm_audit a = {
        .at_ms = r->now_ms,
        .tenant = tenant ? tenant : (r->authed ? r->who.tenant : ""),
        .actor = r->actor,
        .action = action,
        .target = target ? target : "",
        .outcome = outcome,
        .client = r->client,
        .details_json = dj,
    };
    fm_errbuf err;
    int rc = fm_store_audit_append(r->store, &a, &err);
    fm_free(dj);
    if (rc) {
        atomic_fetch_add(&fm_metrics_get()->http_audit_errors, 1);
        fm_logkv(FM_LOG_ERROR, "http", "audit entry not stored", "action", action, "error",
                 err.msg, NULL);
    }
}

/* ---- client address ------------------------------------------------------- */

static void peer_address(const fm_http *h, struct MHD_Connection *conn, char *out, size_t len)
{
    out[0] = '\0';
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    if (ci && ci->client_addr) {
        const struct sockaddr *sa = ci->client_addr;
        if (sa->sa_family == AF_INET)
            inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, out, (socklen_t)len);
        else if (sa->sa_family == AF_INET6)
            inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, out,
                      (socklen_t)len);
    }
    bool trusted = false;
    for (size_t i = 0; i < h->nproxies && !trusted; i++)
        trusted = strcmp(h->proxies[i], out) == 0;
    if (!trusted)
        return;
    /* The right-most X-Forwarded-For entry is the one our proxy added. */
    const char *xff = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Forwarded-For");
    if (!xff)
        return;
    const char *last = strrchr(xff, ',');
    last = last ? last + 1 : xff;
    while (*last == ' ')
        last++;
    char cand[64];
    size_t n = strcspn(last, " ");
    if (n == 0 || n >= sizeof cand)
        return;
    memcpy(cand, last, n);
    cand[n] = '\0';
    unsigned char buf[16];
    if (inet_pton(AF_INET, cand, buf) == 1 || inet_pton(AF_INET6, cand, buf) == 1)
        snprintf(out, len, "%s", cand);
}

/* ---- built-in endpoints ---------------------------------------------------------- */

/* Soak-test hook, only with FM_FAULT_INJECTION=1 at start (see fault.h):
 * POST /debug/fault?fsync=N[&file_fsync=M] makes the next N database
 * fsyncs (and M fm_fsync_fd calls) fail; GET shows what is pending. */
static enum MHD_Result handle_fault(fm_http *h, struct MHD_Connection *conn, const char *method)
{
    if (strcmp(method, "POST") == 0) {
        const char *names[2] = {"fsync", "file_fsync"};
        for (int i = 0; i < 2; i++) {
            const char *v = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, names[i]);
            if (!v)
                continue;
            char *end;
            long n = strtol(v, &end, 10);
            if (*v == '\0' || *end != '\0' || n < 0 || n > 1000000)
                return send_error(h, conn, MHD_HTTP_BAD_REQUEST, "invalid_request",
                                  "expected a count 0..1000000", NULL);
            if (i == 0)
                fm_fault_fsync_fail_next((int)n);
            else
                fm_fsync_fail_next((int)n);
            fm_logkv(FM_LOG_WARN, "http", "fault injection armed", names[i], v, NULL);
        }
    } else if (strcmp(method, "GET") != 0) {
        return send_error(h, conn, MHD_HTTP_METHOD_NOT_ALLOWED, "method_not_allowed",
                          "GET or POST", NULL);
    }
    return send_json(h, conn, MHD_HTTP_OK,
                     json_pack("{s:i,s:I}", "fsync_pending", fm_fault_fsync_pending(),
                               "fsync_injected", (json_int_t)fm_fault_fsync_injected()),
                     NULL);
}

static enum MHD_Result send_health(fm_http *h, struct MHD_Connection *conn, bool details)
{
    fm_health st = {0};
    h->health(h->ud, &st);
    /* The API listener's /healthz is for load balancers and may be public:
     * it names no host, node or process. */
    json_t *doc = details ? json_pack("{s:s,s:s,s:s,s:i}", "status", "ok", "version", FM_VERSION,
                                      "node", h->cfg.node_id, "broker_pid", st.broker_pid)
                          : json_pack("{s:s}", "status", "ok");
    return send_json(h, conn, MHD_HTTP_OK, doc, NULL);
}

/* GET/HEAD only, no body: answers 405/413 and returns true when not so. */
static bool refuse_non_get(fm_http *h, struct MHD_Connection *conn, const char *method,
                           bool has_body, enum MHD_Result *ret)
{
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        api_req r = {.allow = "GET, HEAD"};
        *ret = send_error(h, conn, MHD_HTTP_METHOD_NOT_ALLOWED, "method_not_allowed",
                          "only GET is supported here", &r);
        return true;
    }
    if (has_body) {
        api_req r = {.close = true};
        *ret = send_error(h, conn, MHD_HTTP_CONTENT_TOO_LARGE, "payload_too_large",
                          "this endpoint takes no request body", &r);
        return true;
    }
    return false;
}

/* The operations listener's endpoints (ops.bind:ops.port). */
static enum MHD_Result handle_ops_path(fm_http *h, struct MHD_Connection *conn,
                                       const char *path, const char *method, bool has_body)
{
    if (h->fault && strcmp(path, "/debug/fault") == 0 && !has_body)
        return handle_fault(h, conn, method);
    bool known = strcmp(path, "/healthz") == 0 || strcmp(path, "/readyz") == 0 ||
                 strcmp(path, "/metrics") == 0 || strcmp(path, "/openapi.yaml") == 0 ||
                 strcmp(path, "/status") == 0;
    if (!known)
        return send_error(h, conn, MHD_HTTP_NOT_FOUND, "not_found", "no such endpoint", NULL);
    enum MHD_Result ret;
    if (refuse_non_get(h, conn, method, has_body, &ret))
        return ret;
    if (strcmp(path, "/healthz") == 0)
        return send_health(h, conn, true);
    if (strcmp(path, "/status") == 0) {
        fm_store *st = pool_take(&h->pool);
        json_t *doc = api_status_json(h, st);
        pool_give(&h->pool, st);
        return send_json(h, conn, MHD_HTTP_OK, doc, NULL);
    }
    if (strcmp(path, "/openapi.yaml") == 0)
        return send_buffer(h, conn, MHD_HTTP_OK, "application/yaml",
                           fm_strndup(h->openapi, h->openapi_len), h->openapi_len, NULL);
    if (strcmp(path, "/readyz") == 0) {
        fm_health st = {0};
        h->health(h->ud, &st);
        int ready = st.broker_up && st.mqtt_connected && st.store_ok && st.model_loaded;
        return send_json(
            h, conn, ready ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE,
            json_pack("{s:b,s:{s:b,s:b,s:b,s:b},s:s}", "ready", ready, "checks", "broker",
                      st.broker_up, "mqtt", st.mqtt_connected, "store", st.store_ok, "model",
                      st.model_loaded, "model", st.model),
            NULL);
    }
    char *text;
    size_t len;
    if (fm_metrics_render(fm_metrics_get(), &text, &len) != 0)
        return MHD_NO;
    return send_buffer(h, conn, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", text,
                       len, NULL);
}

/* One of the dashboard's embedded files, with the dashboard's CSP. The
 * files change only with the binary, so browsers may keep them but must
 * ask again (no-cache) after an upgrade. */
static enum MHD_Result send_asset(fm_http *h, struct MHD_Connection *conn,
                                  const fm_web_asset *a)
{
    struct MHD_Response *resp = MHD_create_response_from_buffer(
        (size_t)a->len, (void *)a->data, MHD_RESPMEM_PERSISTENT);
    if (!resp)
        return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", a->type);
    MHD_add_response_header(resp, "Cross-Origin-Opener-Policy", "same-origin");
    api_security_headers(h, resp, "no-cache", FM_WEB_CSP);
    enum MHD_Result ret = MHD_queue_response(conn, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp);
    return ret;
}

/* The API listener's paths outside /api/v1: the bare /healthz and the
 * dashboard (/ and /assets/...). */
static enum MHD_Result handle_api_other(fm_http *h, struct MHD_Connection *conn,
                                        const char *path, const char *method, bool has_body)
{
    const fm_web_asset *asset = fm_web_find(path);
    if (strcmp(path, "/healthz") != 0 && !asset)
        return send_error(h, conn, MHD_HTTP_NOT_FOUND, "not_found", "no such endpoint", NULL);
    enum MHD_Result ret;
    if (refuse_non_get(h, conn, method, has_body, &ret))
        return ret;
    return asset ? send_asset(h, conn, asset) : send_health(h, conn, false);
}

/* ---- the API dispatcher ------------------------------------------------------- */

static bool is_json_type(const char *ct)
{
    if (!ct)
        return false;
    size_t n = strlen("application/json");
    if (strncasecmp(ct, "application/json", n) != 0)
        return false;
    return ct[n] == '\0' || ct[n] == ';' || ct[n] == ' ';
}

/* Only the Authorization header carries tokens: a token in a URL ends up
 * in proxy logs, browser history and Referer headers. */
static bool token_in_query(struct MHD_Connection *conn)
{
    static const char *const names[] = {"access_token", "token", "refresh_token", "jwt",
                                        "id_token", NULL};
    for (int i = 0; names[i]; i++)
        if (MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, names[i]))
            return true;
    return false;
}

static bool authenticate(api_req *r)
{
    const char *hdr = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "Authorization");
    const char *tok = NULL;
    if (hdr && strncasecmp(hdr, "Bearer ", 7) == 0) {
        tok = hdr + 7;
        while (*tok == ' ')
            tok++;
    }
    int rc = tok && *tok ? fm_auth_verify_access(r->store, r->h->jwt, tok, r->now_ms, &r->who)
                         : FM_EPERM;
    if (rc == 0) {
        r->authed = true;
        snprintf(r->actor, sizeof r->actor, "user:%s/%s", r->who.tenant, r->who.username);
        return true;
    }
    r->www_authenticate = true;
    if (rc == FM_EPERM)
        api_error(r, MHD_HTTP_UNAUTHORIZED, "unauthorized",
                  tok ? "the access token is invalid, expired or revoked"
                      : "an access token is required (Authorization: Bearer <token>)");
    else
        api_store_error(r, rc);
    return false;
}

static void housekeeping(api_req *r)
{
    int64_t due = atomic_load(&r->h->next_housekeeping_ms);
    if (r->now_ms < due ||
        !atomic_compare_exchange_strong(&r->h->next_housekeeping_ms, &due,
                                        r->now_ms + HOUSEKEEPING_MS))
        return;
    fm_auth_housekeeping(r->store, &r->h->throttle, r->now_ms);
}

static enum MHD_Result dispatch(fm_http *h, struct MHD_Connection *conn, const char *method,
                                conn_state *cs)
{
    api_req r = {.h = h, .conn = conn, .method = method, .url = cs->path, .now_ms = fm_wall_ms()};
    snprintf(r.actor, sizeof r.actor, "anonymous");
    peer_address(h, conn, r.client, sizeof r.client);
    const api_route *rt = cs->route;
    for (size_t i = 0; rt && i < API_MAX_PARAMS; i++) {
        memcpy(r.pbuf[i], cs->params[i], sizeof r.pbuf[i]);
        r.params[i] = r.pbuf[i];
    }
    if (token_in_query(conn)) {
        api_error(&r, MHD_HTTP_BAD_REQUEST, "invalid_request",
                  "tokens are accepted only in the Authorization header, never in the URL");
        goto answer;
    }
    if (!rt) {
        if (cs->path_known) {
            r.allow = cs->allow;
            api_error(&r, MHD_HTTP_METHOD_NOT_ALLOWED, "method_not_allowed",
                      "%s is not supported here (allowed: %s)", method, cs->allow);
        } else {
            api_error(&r, MHD_HTTP_NOT_FOUND, "not_found", "no such endpoint");
        }
        goto answer;
    }
    if (cs->bad_param) {
        atomic_fetch_add(&fm_metrics_get()->http_refused_target, 1);
        api_error(&r, MHD_HTTP_BAD_REQUEST, "invalid_request",
                  "a path parameter holds an encoded '/', '\\', '.', '..' or control "
                  "character");
        goto answer;
    }
    if (cs->too_large) {
        r.close = true;
        api_error(&r, MHD_HTTP_CONTENT_TOO_LARGE, "payload_too_large",
                  "the request body is larger than %zu bytes",
                  rt->body_max ? rt->body_max : (size_t)API_BODY_EMPTY_MAX);
        goto answer;
    }
    if (!rt->body_max && cs->len > 0) {
        json_t *empty = NULL;
        char msg[192];
        int ok = fm_api_parse_body(cs->body, cs->len, &empty, msg, sizeof msg) == 0 &&
                 json_object_size(empty) == 0;
        json_decref(empty);
        if (!ok) {
            api_error(&r, MHD_HTTP_BAD_REQUEST, "invalid_request",
                      "this endpoint takes no request body (an empty JSON object at most)");
            goto answer;
        }
    }
    if (rt->body_max) {
        const char *ct = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Type");
        if (!is_json_type(ct)) {
            api_error(&r, MHD_HTTP_UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type",
                      "the request body must be application/json");
            goto answer;
        }
        char msg[192];
        if (fm_api_parse_body(cs->body, cs->len, &r.json, msg, sizeof msg) != 0) {
            api_error(&r, MHD_HTTP_BAD_REQUEST, "invalid_request", "%s", msg);
            goto answer;
        }
        r.body = cs->body;
        r.body_len = cs->len;
    }
    r.store = pool_take(&h->pool);
    housekeeping(&r);
    bool pub = rt->info.action && strcmp(rt->info.action, "public") == 0;
    if (pub || authenticate(&r)) {
        if (!pub && rt->info.action && (r.who.role_mask & h->mfa_roles) &&
            !r.who.second_factor) {
            /* A role that must use a second factor can still reach its own
             * account (routes without a permission), to enrol one. */
            api_audit(&r, NULL, "access.denied", rt->info.path, "denied",
                      json_pack("{s:s,s:s}", "method", method, "reason", "second factor needed"));
            api_error(&r, MHD_HTTP_FORBIDDEN, "mfa_required",
                      "your role needs a second factor: enrol one (POST /api/v1/me/mfa/totp), "
                      "then sign in again with a code");
        } else if (!pub && rt->info.action && !fm_auth_allowed(r.who.role_mask, rt->info.action)) {
            api_audit(&r, NULL, "access.denied", rt->info.path, "denied",
                      json_pack("{s:s,s:s}", "method", method, "permission", rt->info.action));
            api_error(&r, MHD_HTTP_FORBIDDEN, "forbidden",
                      "your roles do not allow this (%s needed)", rt->info.action);
        } else {
            rt->fn(&r);
        }
    }
    pool_give(&h->pool, r.store);
    r.store = NULL;
answer:
    json_decref(r.json);
    fm_metrics *mx = fm_metrics_get();
    atomic_fetch_add(&mx->http_requests, 1);
    if (r.stream)
        return api_stream_answer(&r);
    if (r.status >= 500)
        atomic_fetch_add(&mx->http_errors, 1);
    if (r.text)
        return send_buffer(h, conn, r.status, r.text_type, r.text, r.text_len, &r);
    if (!r.out && r.status == MHD_HTTP_NO_CONTENT)
        return send_buffer(h, conn, r.status, NULL, fm_strdup(""), 0, &r);
    if (!r.out || !r.status)
        api_error(&r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "internal error");
    return send_json(h, conn, r.status, r.out, &r);
}

/* ---- the edge: framing, targets, slow clients, per-address cap ----------- */

static conn_track *track_of(struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return ci ? ci->socket_context : NULL;
}

static void track_phase(fm_http *h, struct MHD_Connection *conn, int phase)
{
    conn_track *t = track_of(conn);
    if (!t)
        return;
    fm_thread_lock(&h->edge);
    t->phase = phase;
    t->since_ns = fm_mono_ns();
    t->body_got = 0;
    fm_thread_unlock(&h->edge);
}

static void track_body(fm_http *h, struct MHD_Connection *conn, size_t n)
{
    conn_track *t = track_of(conn);
    if (!t)
        return;
    fm_thread_lock(&h->edge);
    t->body_got += n;
    fm_thread_unlock(&h->edge);
}

/* libmicrohttpd reports every connection's start and end; the socket is
 * closed only after the end is reported, so under the edge lock a listed
 * fd is always the connection's own. */
static void conn_notify(void *cls, struct MHD_Connection *conn, void **socket_context,
                        enum MHD_ConnectionNotificationCode code)
{
    fm_http *h = cls;
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
        conn_track *t = fm_calloc(1, sizeof *t);
        if (!t)
            return; /* untracked: only the idle timeout applies */
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        t->fd = ci ? ci->connect_fd : -1;
        t->phase = PHASE_HEAD;
        t->since_ns = fm_mono_ns();
        fm_thread_lock(&h->edge);
        t->next = h->conns;
        if (h->conns)
            h->conns->prev = t;
        h->conns = t;
        fm_thread_unlock(&h->edge);
        *socket_context = t;
    } else if (code == MHD_CONNECTION_NOTIFY_CLOSED && *socket_context) {
        conn_track *t = *socket_context;
        fm_thread_lock(&h->edge);
        if (t->prev)
            t->prev->next = t->next;
        else
            h->conns = t->next;
        if (t->next)
            t->next->prev = t->prev;
        fm_thread_unlock(&h->edge);
        fm_free(t);
        *socket_context = NULL;
    }
}

/* With the edge lock held: shuts down connections past their deadline. A
 * request head must be whole within http.header_timeout_s (an idle
 * keep-alive connection waits for one); a body must average
 * http.body_min_rate bytes/s after BODY_GRACE_NS. */
static void edge_reap(fm_http *h, uint64_t now)
{
    uint64_t head_ns = (uint64_t)h->cfg.http_header_timeout_s * 1000000000ull;
    double rate = h->cfg.http_body_min_rate;
    for (conn_track *t = h->conns; t; t = t->next) {
        if (t->cut || t->fd < 0 || now < t->since_ns)
            continue;
        uint64_t el = now - t->since_ns;
        bool slow = false;
        if (t->phase == PHASE_HEAD)
            slow = el > head_ns;
        else if (t->phase == PHASE_BODY && rate > 0 && el > BODY_GRACE_NS)
            slow = (double)t->body_got < rate * (double)(el - BODY_GRACE_NS) / 1e9;
        if (slow) {
            /* libmicrohttpd sees the end of the stream and closes it. */
            shutdown(t->fd, SHUT_RDWR);
            t->cut = true;
            atomic_fetch_add(&fm_metrics_get()->http_cut_slow, 1);
        }
    }
}

static void *edge_main(void *arg)
{
    fm_http *h = arg;
    fm_thread_lock(&h->edge);
    while (!fm_thread_should_stop(&h->edge)) {
        edge_reap(h, fm_mono_ns());
        api_status_tick(h, fm_mono_ns());
        fm_thread_wait_ns(&h->edge, EDGE_TICK_NS);
    }
    fm_thread_unlock(&h->edge);
    return NULL;
}

/* Behind a trusted proxy: counts a request in flight for addr; false when
 * addr already has http.per_address_limit of them. */
static bool inflight_enter(fm_http *h, const char *addr)
{
    bool ok = false;
    fm_thread_lock(&h->edge);
    addr_count *free_slot = NULL, *slot = NULL;
    for (size_t i = 0; i < h->ninflight && !slot; i++) {
        if (h->inflight[i].n == 0 && !free_slot)
            free_slot = &h->inflight[i];
        else if (h->inflight[i].n && strcmp(h->inflight[i].addr, addr) == 0)
            slot = &h->inflight[i];
    }
    if (!slot && !free_slot && h->ninflight < h->inflight_cap)
        free_slot = &h->inflight[h->ninflight++];
    if (!slot && free_slot) {
        slot = free_slot;
        snprintf(slot->addr, sizeof slot->addr, "%s", addr);
        slot->n = 0;
    }
    if (slot && slot->n < (unsigned)h->cfg.http_per_address_limit) {
        slot->n++;
        ok = true;
    }
    fm_thread_unlock(&h->edge);
    return ok;
}

static void inflight_leave(fm_http *h, const char *addr)
{
    fm_thread_lock(&h->edge);
    for (size_t i = 0; i < h->ninflight; i++)
        if (h->inflight[i].n && strcmp(h->inflight[i].addr, addr) == 0) {
            h->inflight[i].n--;
            break;
        }
    fm_thread_unlock(&h->edge);
}

static enum MHD_Result head_field(void *cls, enum MHD_ValueKind kind, const char *key,
                                  size_t key_size, const char *value, size_t value_size)
{
    (void)kind;
    fm_http_head_add(cls, key, key_size, value ? value : "", value ? value_size : 0);
    return MHD_YES;
}

/* The request line arrived: keep the target as sent, before libmicrohttpd
 * decodes it. The result is the request's conn_state. */
static void *uri_seen(void *cls, const char *uri, struct MHD_Connection *conn)
{
    (void)cls;
    (void)conn;
    conn_state *cs = fm_calloc(1, sizeof *cs);
    if (cs)
        cs->target_rc = fm_http_target_path(uri, cs->path, sizeof cs->path);
    return cs;
}

/* The head is complete: checks framing and the target. true when the
 * request was refused (answered, and the connection will close). */
static bool edge_refuses(fm_http *h, struct MHD_Connection *conn, const char *version,
                         conn_state *cs, bool *has_body, enum MHD_Result *ret)
{
    fm_http_head head = {.http10 = strcmp(version, MHD_HTTP_VERSION_1_0) == 0};
    MHD_get_connection_values_n(conn, MHD_HEADER_KIND, head_field, &head);
    const char *why = fm_http_head_check(&head);
    api_req r = {.close = true};
    if (why) {
        atomic_fetch_add(&fm_metrics_get()->http_refused_framing, 1);
        *ret = send_error(h, conn, MHD_HTTP_BAD_REQUEST, "bad_request", why, &r);
        return true;
    }
    if (cs->target_rc == FM_ERANGE) {
        atomic_fetch_add(&fm_metrics_get()->http_refused_target, 1);
        *ret = send_error(h, conn, MHD_HTTP_URI_TOO_LONG, "uri_too_long",
                          "the request path is too long", &r);
        return true;
    }
    if (cs->target_rc != 0) {
        atomic_fetch_add(&fm_metrics_get()->http_refused_target, 1);
        *ret = send_error(h, conn, MHD_HTTP_BAD_REQUEST, "bad_request",
                          "the request target must be a path of visible ASCII characters "
                          "with well-formed %-escapes",
                          &r);
        return true;
    }
    *has_body = head.n_coding || (head.n_length && head.length > 0);
    return false;
}

/* Receives a request body chunk into cs (bounded by cs->max). */
static enum MHD_Result take_body(conn_state *cs, bool api, const char *upload, size_t n)
{
    if (cs->too_large)
        return MHD_YES;
    if (!api || cs->len + n > cs->max) {
        cs->too_large = true;
        fm_free(cs->body);
        cs->body = NULL;
        cs->len = 0;
        return MHD_YES;
    }
    char *nb = fm_realloc(cs->body, cs->len + n + 1);
    if (!nb)
        return MHD_NO;
    memcpy(nb + cs->len, upload, n);
    cs->body = nb;
    cs->len += n;
    cs->body[cs->len] = '\0';
    return MHD_YES;
}

/* The calls both listeners share: the edge checks on the first call, the
 * body, then answer(). */
static enum MHD_Result handle_common(fm_http *h, bool ops, struct MHD_Connection *conn,
                                     const char *method, const char *version,
                                     const char *upload, size_t *upload_size, void **con_cls)
{
    conn_state *cs = *con_cls;
    if (!cs)
        return MHD_NO; /* out of memory when the request line arrived */
    bool api = !ops && strncmp(cs->path, API_PREFIX "/", strlen(API_PREFIX) + 1) == 0;
    if (!cs->started) {
        cs->started = true;
        bool has_body = false;
        enum MHD_Result ret;
        if (edge_refuses(h, conn, version, cs, &has_body, &ret))
            return ret;
        track_phase(h, conn, has_body ? PHASE_BODY : PHASE_ANSWER);
        if (api && h->nproxies && h->cfg.http_per_address_limit > 0) {
            /* Behind a proxy every connection comes from it: the cap
             * counts requests in flight per forwarded client address. */
            char addr[64];
            peer_address(h, conn, addr, sizeof addr);
            if (!inflight_enter(h, addr)) {
                atomic_fetch_add(&fm_metrics_get()->http_refused_address, 1);
                api_req r = {.close = true, .retry_after = 1};
                return send_error(h, conn, MHD_HTTP_TOO_MANY_REQUESTS, "too_many_requests",
                                  "too many requests in flight from your address; retry later",
                                  &r);
            }
            snprintf(cs->counted, sizeof cs->counted, "%s", addr);
        }
        if (api) {
            api_req probe = {.url = cs->path, .method = method};
            cs->route = api_route_find(&probe, cs->allow, sizeof cs->allow, &cs->path_known,
                                       &cs->bad_param);
            memcpy(cs->params, probe.pbuf, sizeof cs->params);
            /* Routes without a body still accept an empty JSON object,
             * which many clients send with every POST. */
            cs->max = cs->route && cs->route->body_max ? cs->route->body_max : API_BODY_EMPTY_MAX;
        }
        /* A declared length over the limit is refused before any of the
         * body is read (the connection then closes). */
        const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
        if (cl && api && cs->route && strtoull(cl, NULL, 10) > cs->max) {
            cs->too_large = true;
            return dispatch(h, conn, method, cs);
        }
        return MHD_YES;
    }
    if (*upload_size != 0) {
        size_t n = *upload_size;
        *upload_size = 0;
        track_body(h, conn, n);
        return take_body(cs, api, upload, n);
    }
    track_phase(h, conn, PHASE_ANSWER);
    bool has_body = cs->too_large || cs->len > 0;
    if (ops)
        return handle_ops_path(h, conn, cs->path, method, has_body);
    if (!api)
        return handle_api_other(h, conn, cs->path, method, has_body);
    return dispatch(h, conn, method, cs);
}

static enum MHD_Result handle_api(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls)
{
    (void)url; /* decoded by libmicrohttpd: routing uses the path as sent */
    return handle_common(cls, false, conn, method, version, upload, upload_size, con_cls);
}

static enum MHD_Result handle_ops(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls)
{
    (void)url;
    return handle_common(cls, true, conn, method, version, upload, upload_size, con_cls);
}

static void completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                      enum MHD_RequestTerminationCode toe)
{
    fm_http *h = cls;
    (void)toe;
    conn_state *cs = *con_cls;
    if (cs) {
        if (cs->counted[0])
            inflight_leave(h, cs->counted);
        fm_free(cs->body);
        fm_free(cs);
        *con_cls = NULL;
    }
    /* The connection now waits for its next request head. */
    track_phase(h, conn, PHASE_HEAD);
}

/* ---- lifecycle ------------------------------------------------------------------- */

/* libmicrohttpd's own messages (TLS handshake failures, socket errors) as
 * structured log lines like everything else. */
static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
        msg[--n] = '\0';
    fm_logkv(FM_LOG_INFO, "http", "libmicrohttpd", "detail", msg, NULL);
}

static int parse_proxies(fm_http *h, const char *list, fm_errbuf *err)
{
    size_t n = 0;
    for (const char *p = list; *p; p++)
        n += *p == ',';
    h->proxies = fm_calloc(n + 1, sizeof *h->proxies);
    if (!h->proxies)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    const char *p = list;
    while (*p) {
        size_t l = strcspn(p, ",");
        char a[64];
        unsigned char buf[16];
        if (l == 0 || l >= sizeof a)
            return fm_errf(err, FM_EINVAL, "http.trusted_proxies: empty or overlong entry");
        memcpy(a, p, l);
        a[l] = '\0';
        if (inet_pton(AF_INET, a, buf) != 1 && inet_pton(AF_INET6, a, buf) != 1)
            return fm_errf(err, FM_EINVAL, "http.trusted_proxies: '%s' is not an IP address", a);
        memcpy(h->proxies[h->nproxies++], a, l + 1);
        p += l;
        if (*p == ',')
            p++;
    }
    return 0;
}

static int load_model(fm_http *h, fm_errbuf *err)
{
    pthread_mutex_init(&h->model_mu, NULL);
    pthread_mutex_init(&h->models_mu, NULL);
    int rc = fm_model_load(h->cfg.model_dir, &h->model, err);
    if (rc)
        return rc;
    snprintf(h->model_ref, sizeof h->model_ref, "%s@%s", fm_model_name(h->model),
             fm_model_version(h->model));
    /* The bundled model is the first entry of the predict cache. */
    h->models = fm_calloc(1, sizeof *h->models);
    api_model *e = h->models ? fm_calloc(1, sizeof *e) : NULL;
    if (!e)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    e->model = h->model;
    snprintf(e->ref, sizeof e->ref, "%s", h->model_ref);
    pthread_mutex_init(&e->mu, NULL);
    h->models[0] = e;
    h->nmodels = 1;
    return 0;
}

int fm_http_start(const fm_http_opts *o, fm_http **out, fm_errbuf *err)
{
    const fm_config *cfg = o->cfg;
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)cfg->http_port);
    if (inet_pton(AF_INET, cfg->http_bind, &sa.sin_addr) != 1)
        return fm_errf(err, FM_EINVAL, "http.bind '%s' is not an IPv4 address", cfg->http_bind);
    struct sockaddr_in ops_sa = {0};
    ops_sa.sin_family = AF_INET;
    ops_sa.sin_port = htons((uint16_t)cfg->ops_port);
    if (inet_pton(AF_INET, cfg->ops_bind, &ops_sa.sin_addr) != 1)
        return fm_errf(err, FM_EINVAL, "ops.bind '%s' is not an IPv4 address", cfg->ops_bind);
    if (cfg->ops_port == cfg->http_port)
        return fm_errf(err, FM_EINVAL, "ops.port and http.port must differ (both %d)",
                       cfg->ops_port);
    fm_http *h = fm_calloc(1, sizeof *h);
    if (!h)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    h->cfg = *cfg;
    pthread_mutex_init(&h->streams_mu, NULL);
    h->health = o->health;
    h->ud = o->ud;
    h->pipeline = o->pipeline;
    h->functions = o->functions;
    h->throttle = FM_THROTTLE_POLICY_DEFAULT;
    h->tokens.access_ttl_s = cfg->http_access_ttl_s;
    h->openapi = (char *)fm_openapi_yaml;
    h->openapi_len = (size_t)fm_openapi_yaml_len;
    h->tls = strcmp(cfg->http_tls, "on") == 0;
    char path[PATH_MAX];
    int rc = parse_proxies(h, cfg->http_trusted_proxies, err);
    if (!rc && cfg->http_mfa_roles[0] && fm_auth_roles_parse(cfg->http_mfa_roles, &h->mfa_roles))
        rc = fm_errf(err, FM_EINVAL, "http.mfa_roles: '%s' is not a list of roles",
                     cfg->http_mfa_roles);
    if (!rc)
        rc = fm_jwt_key_load(fm_config_path(cfg, "pki/jwt.key", path, sizeof path), &h->jwt, err);
    if (!rc)
        rc = pool_open(&h->pool, cfg, (size_t)cfg->http_threads, err);
    if (!rc)
        rc = load_model(h, err);
    if (!rc)
        rc = api_streams_start(h, err);
    if (!rc && h->tls) {
        size_t n;
        if (!MHD_is_feature_supported(MHD_FEATURE_TLS))
            rc = fm_errf(err, FM_EINVAL, "http.tls=on but libmicrohttpd has no TLS support");
        else if (fm_read_file(fm_config_path(cfg, "pki/broker.crt", path, sizeof path),
                              &h->tls_cert, &n) != 0 ||
                 fm_read_file(fm_config_path(cfg, "pki/broker.key", path, sizeof path),
                              &h->tls_key, &n) != 0)
            rc = fm_errf(err, FM_EINVAL, "http.tls=on: cannot read pki/broker.crt or .key");
    }
    if (rc) {
        fm_http_stop(h);
        return rc;
    }
    h->fault = fm_fault_enabled_by_env();
    if (h->fault)
        fm_logf(FM_LOG_WARN, "http", "FM_FAULT_INJECTION=1: POST /debug/fault is enabled");
    h->inflight_cap = 1024;
    h->inflight = fm_calloc(h->inflight_cap, sizeof *h->inflight);
    if (!h->inflight || fm_thread_start(&h->edge, "fm-http-edge", edge_main, h) != 0) {
        fm_http_stop(h);
        return fm_errf(err, FM_ENOMEM, "out of memory");
    }
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_USE_ERROR_LOG;
    /* Live streams suspend their connection while they have nothing to send. */
    unsigned api_flags = flags | MHD_ALLOW_SUSPEND_RESUME;
    struct MHD_OptionItem tls_opts[] = {
        {MHD_OPTION_HTTPS_MEM_CERT, 0, h->tls_cert},
        {MHD_OPTION_HTTPS_MEM_KEY, 0, h->tls_key},
        {MHD_OPTION_HTTPS_PRIORITIES, 0,
         (void *)"SECURE256:+SECURE128:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"},
        {MHD_OPTION_END, 0, NULL},
    };
    struct MHD_OptionItem no_opts[] = {{MHD_OPTION_END, 0, NULL}};
    /* libmicrohttpd's own timeout is an idle one (any byte resets it); the
     * edge thread enforces the head deadline and the body rate. */
    unsigned idle_s = (unsigned)(h->cfg.http_header_timeout_s + 5 > 15
                                     ? h->cfg.http_header_timeout_s + 5
                                     : 15);
    /* Without a proxy, the per-address cap counts connections; behind one,
     * every connection is the proxy's and the cap counts requests in
     * flight per forwarded address instead (handle_common). */
    unsigned per_ip = h->nproxies ? 0u : (unsigned)cfg->http_per_address_limit;
    h->daemon = MHD_start_daemon(
        api_flags | (h->tls ? MHD_USE_TLS : 0), (uint16_t)cfg->http_port, NULL, NULL, handle_api, h,
        MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sa,
        MHD_OPTION_THREAD_POOL_SIZE, (unsigned)cfg->http_threads, MHD_OPTION_CONNECTION_TIMEOUT,
        idle_s, MHD_OPTION_CONNECTION_LIMIT, (unsigned)512, MHD_OPTION_PER_IP_CONNECTION_LIMIT,
        per_ip, MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(64 * 1024),
        MHD_OPTION_URI_LOG_CALLBACK, uri_seen, h, MHD_OPTION_NOTIFY_CONNECTION, conn_notify, h,
        MHD_OPTION_NOTIFY_COMPLETED, completed, h, MHD_OPTION_ARRAY,
        h->tls ? tls_opts : no_opts, MHD_OPTION_END);
    if (!h->daemon) {
        fm_http_stop(h);
        return fm_errf(err, FM_EIO, "cannot listen on %s:%d", cfg->http_bind, cfg->http_port);
    }
    h->ops = MHD_start_daemon(
        flags, (uint16_t)cfg->ops_port, NULL, NULL, handle_ops, h, MHD_OPTION_EXTERNAL_LOGGER,
        mhd_log, NULL, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ops_sa,
        MHD_OPTION_CONNECTION_TIMEOUT, idle_s, MHD_OPTION_CONNECTION_LIMIT, (unsigned)64,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(32 * 1024), MHD_OPTION_URI_LOG_CALLBACK,
        uri_seen, h, MHD_OPTION_NOTIFY_CONNECTION, conn_notify, h, MHD_OPTION_NOTIFY_COMPLETED,
        completed, h, MHD_OPTION_END);
    if (!h->ops) {
        fm_http_stop(h);
        return fm_errf(err, FM_EIO, "cannot listen on %s:%d (ops.bind, ops.port)", cfg->ops_bind,
                       cfg->ops_port);
    }
    if ((rc = api_trainer_start(h, err)) != 0) {
        fm_http_stop(h);
        return rc;
    }
    fm_logf(FM_LOG_INFO, "http", "listening on %s://%s:%d, operations on http://%s:%d",
            h->tls ? "https" : "http", cfg->http_bind, cfg->http_port, cfg->ops_bind,
            cfg->ops_port);
    *out = h;
    return 0;
}

void fm_http_stop(fm_http *h)
{
    if (!h)
        return;
    api_trainer_stop(h);
    api_streams_stop(h); /* every stream ends: none may stay suspended */
    if (h->ops)
        MHD_stop_daemon(h->ops);
    if (h->daemon)
        MHD_stop_daemon(h->daemon);
    fm_store_close(h->pump_store);
    pthread_mutex_destroy(&h->streams_mu);
    fm_thread_stop(&h->edge);
    fm_free(h->inflight);
    pool_close(&h->pool);
    fm_jwt_key_free(h->jwt);
    if (h->model) {
        api_models_free(h);
        fm_model_free(h->model);
        pthread_mutex_destroy(&h->model_mu);
    }
    fm_free(h->proxies);
    fm_free(h->tls_cert);
    fm_free(h->tls_key);
    fm_free(h);
}
