#include "fleetml/api.h"
#include "fleetml/fault.h"
#include "fleetml/metrics.h"

#include <arpa/inet.h>
#include <jansson.h>
#include <microhttpd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct fm_http {
    struct MHD_Daemon *daemon;
    fm_health_fn health;
    void *ud;
    char node[64];
    int fault; /* FM_FAULT_INJECTION=1 at start: /debug/fault exists */
};

static enum MHD_Result respond(struct MHD_Connection *conn, unsigned status, const char *type,
                               char *body, size_t len)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        fm_free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", type);
    MHD_add_response_header(r, "Cache-Control", "no-store");
    MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
    enum MHD_Result ret = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result respond_json(struct MHD_Connection *conn, unsigned status, json_t *doc)
{
    char *s = doc ? json_dumps(doc, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(doc);
    if (!s)
        return MHD_NO;
    return respond(conn, status, "application/json", s, strlen(s));
}

static enum MHD_Result respond_error(struct MHD_Connection *conn, unsigned status,
                                     const char *code, const char *message)
{
    return respond_json(conn, status,
                        json_pack("{s:{s:s,s:s}}", "error", "code", code, "message", message));
}

/* Soak-test hook, only with FM_FAULT_INJECTION=1 at start (see fault.h):
 * POST /debug/fault?fsync=N[&file_fsync=M] makes the next N database
 * fsyncs (and M fm_fsync_fd calls) fail; GET shows what is pending. */
static enum MHD_Result handle_fault(struct MHD_Connection *conn, const char *method)
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
                return respond_error(conn, MHD_HTTP_BAD_REQUEST, "invalid_request",
                                     "expected a count 0..1000000");
            if (i == 0)
                fm_fault_fsync_fail_next((int)n);
            else
                fm_fsync_fail_next((int)n);
            fm_logkv(FM_LOG_WARN, "http", "fault injection armed", names[i], v, NULL);
        }
    } else if (strcmp(method, "GET") != 0) {
        return respond_error(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "method_not_allowed",
                             "GET or POST");
    }
    return respond_json(conn, MHD_HTTP_OK,
                        json_pack("{s:i,s:I}", "fsync_pending", fm_fault_fsync_pending(),
                                  "fsync_injected", (json_int_t)fm_fault_fsync_injected()));
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *conn, const char *url,
                              const char *method, const char *version, const char *upload,
                              size_t *upload_size, void **con_cls)
{
    (void)version;
    (void)upload;
    fm_http *h = cls;
    /* First call per request: headers only. Bodies are not accepted by any
     * route yet, so the second call is where we answer. */
    if (*con_cls == NULL) {
        *con_cls = h;
        return MHD_YES;
    }
    if (*upload_size != 0)
        return respond_error(conn, MHD_HTTP_CONTENT_TOO_LARGE, "payload_too_large",
                             "this endpoint takes no request body");
    if (h->fault && strcmp(url, "/debug/fault") == 0)
        return handle_fault(conn, method);
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
        return respond_error(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "method_not_allowed",
                             "only GET is supported here");
    if (strcmp(url, "/healthz") == 0) {
        fm_health st = {0};
        h->health(h->ud, &st);
        return respond_json(conn, MHD_HTTP_OK,
                            json_pack("{s:s,s:s,s:s,s:i}", "status", "ok", "version", FM_VERSION,
                                      "node", h->node, "broker_pid", st.broker_pid));
    }
    if (strcmp(url, "/readyz") == 0) {
        fm_health st = {0};
        h->health(h->ud, &st);
        int ready = st.broker_up && st.mqtt_connected && st.store_ok && st.model_loaded;
        return respond_json(
            conn, ready ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE,
            json_pack("{s:b,s:{s:b,s:b,s:b,s:b},s:s}", "ready", ready, "checks", "broker",
                      st.broker_up, "mqtt", st.mqtt_connected, "store", st.store_ok, "model",
                      st.model_loaded, "model", st.model));
    }
    if (strcmp(url, "/metrics") == 0) {
        char *text;
        size_t len;
        if (fm_metrics_render(fm_metrics_get(), &text, &len) != 0)
            return MHD_NO;
        return respond(conn, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", text, len);
    }
    return respond_error(conn, MHD_HTTP_NOT_FOUND, "not_found", "no such endpoint");
}

int fm_http_start(const fm_config *cfg, fm_health_fn health, void *ud, fm_http **out,
                  fm_errbuf *err)
{
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)cfg->http_port);
    if (inet_pton(AF_INET, cfg->http_bind, &sa.sin_addr) != 1)
        return fm_errf(err, FM_EINVAL, "http.bind '%s' is not an IPv4 address", cfg->http_bind);
    fm_http *h = fm_calloc(1, sizeof *h);
    if (!h)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    h->health = health;
    h->ud = ud;
    snprintf(h->node, sizeof h->node, "%s", cfg->node_id);
    h->fault = fm_fault_enabled_by_env();
    if (h->fault)
        fm_logf(FM_LOG_WARN, "http", "FM_FAULT_INJECTION=1: POST /debug/fault is enabled");
    h->daemon = MHD_start_daemon(
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_USE_ERROR_LOG,
        (uint16_t)cfg->http_port, NULL, NULL, handle, h, MHD_OPTION_SOCK_ADDR,
        (struct sockaddr *)&sa, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)30,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)512, MHD_OPTION_CONNECTION_MEMORY_LIMIT,
        (size_t)(64 * 1024), MHD_OPTION_END);
    if (!h->daemon) {
        fm_free(h);
        return fm_errf(err, FM_EIO, "cannot listen on %s:%d", cfg->http_bind, cfg->http_port);
    }
    fm_logf(FM_LOG_INFO, "http", "listening on http://%s:%d", cfg->http_bind, cfg->http_port);
    *out = h;
    return 0;
}

void fm_http_stop(fm_http *h)
{
    if (!h)
        return;
    MHD_stop_daemon(h->daemon);
    fm_free(h);
}
