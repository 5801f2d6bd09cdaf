/*
 * `fleetml serve`: one node of the platform.
 *
 * Start order: lake writer (recovers half-published objects first),
 * pipeline (store + model), broker, MQTT client, HTTP. Stop order: MQTT
 * client and HTTP first (no new work; HTTP requests in flight finish),
 * then the pipeline drains what it holds, the lake writer publishes its
 * open objects, the broker stops.
 */
#include "cli/cli.h"
#include "fleetml/api.h"
#include "fleetml/broker.h"
#include "fleetml/lake.h"
#include "fleetml/measurement.h"
#include "fleetml/metrics.h"
#include "fleetml/mqtt.h"
#include "fleetml/pipeline.h"
#include "fleetml/ratelimit.h"
#include "fleetml/registry.h"

#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

typedef struct server {
    fm_config cfg;
    fm_broker *broker;
    fm_pipeline *pipeline;
    fm_registry *registry;
    fm_lake_writer *lake;
    fm_http *http;
    fm_ratelimit *device_rates; /* used by the MQTT thread only */
    _Atomic(fm_mqtt *) mqtt;
} server;

static int publish(void *ud, const char *topic, const void *payload, size_t len,
                   const void *corr, size_t corr_len)
{
    server *s = ud;
    fm_mqtt *c = atomic_load(&s->mqtt);
    return c ? fm_mqtt_publish(c, topic, payload, len, corr, corr_len) : FM_EUNAVAIL;
}

static void committed(void *ud)
{
    server *s = ud;
    if (s->lake)
        fm_lake_writer_notify(s->lake);
}

/* fleet/<device>/measurements -> device id; anything else -> 0. */
static int measurement_device(const char *topic, char *out, size_t len)
{
    const char *prefix = "fleet/", *suffix = "/measurements";
    size_t pl = strlen(prefix), sl = strlen(suffix), tl = strlen(topic);
    if (tl <= pl + sl || strncmp(topic, prefix, pl) != 0 || strcmp(topic + tl - sl, suffix) != 0)
        return 0;
    size_t idl = tl - pl - sl;
    if (idl >= len)
        return 0;
    memcpy(out, topic + pl, idl);
    out[idl] = '\0';
    return fm_device_id_valid(out);
}

static void on_measurement(server *s, const char *device, const fm_mqtt_msg *mm)
{
    int rc;
    const char *code = FM_VERR_UNAVAILABLE;
    /* A device over its rate is answered at once, before anything is
     * copied or queued: one flooding device cannot crowd out the rest. */
    if (s->cfg.device_rate > 0 && s->device_rates &&
        !fm_ratelimit_take(s->device_rates, device, s->cfg.device_rate, s->cfg.device_burst,
                           fm_mono_ns())) {
        rc = FM_EPERM;
        code = FM_VERR_RATE_LIMITED;
    } else {
        fm_inmsg *m = fm_inmsg_new(device, mm->payload, mm->len, mm->response_topic, mm->corr,
                                   mm->corr_len);
        rc = m ? fm_pipeline_submit(s->pipeline, m) : FM_ENOMEM;
        if (rc == 0)
            return;
        fm_inmsg_free(m);
    }
    /* Overloaded, over rate or stopping: tell the device now so it retries
     * later, rather than holding a message we cannot promise to store. */
    fm_metrics *mx = fm_metrics_get();
    atomic_fetch_add(&mx->received, 1);
    atomic_fetch_add(&mx->rejected[fm_reject_reason_from_code(code)], 1);
    char mid[FM_MEAS_ID_MAX + 1], topic[256];
    fm_measurement_peek_id(mm->payload, mm->len, mid);
    char *doc = fm_error_result_json(mid, code,
                                     rc == FM_EPERM  ? "this device sends too fast, retry later"
                                     : rc == FM_EBUSY ? "platform overloaded, retry later"
                                                      : "platform unavailable, retry later");
    if (doc) {
        fm_reply_topic(device, mm->response_topic, "results", topic, sizeof topic);
        publish(s, topic, doc, strlen(doc), mm->corr, mm->corr_len);
        fm_free(doc);
    }
}

/* The broker plugin's admission report (FM_ADMISSION_TOPIC): counts. */
static void on_admission(const fm_mqtt_msg *mm)
{
    unsigned long long msgs = 0, bytes = 0;
    char text[128];
    if (mm->len >= sizeof text)
        return;
    memcpy(text, mm->payload, mm->len);
    text[mm->len] = '\0';
    if (sscanf(text, "{\"refused_messages\":%llu,\"refused_bytes\":%llu}", &msgs, &bytes) != 2)
        return;
    fm_metrics *mx = fm_metrics_get();
    atomic_fetch_add(&mx->broker_refused_msgs, msgs);
    atomic_fetch_add(&mx->broker_refused_bytes, bytes);
}

/* Runs on the MQTT network thread: route, copy and queue, nothing more. */
static void on_message(void *ud, const fm_mqtt_msg *mm)
{
    server *s = ud;
    char device[FM_DEVICE_ID_MAX + 1];
    if (strcmp(mm->topic, FM_ADMISSION_TOPIC) == 0) {
        on_admission(mm);
        return;
    }
    if (measurement_device(mm->topic, device, sizeof device)) {
        on_measurement(s, device, mm);
        return;
    }
    if (s->registry && fm_registry_handles(mm->topic)) {
        fm_regmsg_in in = {.topic = mm->topic, .payload = mm->payload, .len = mm->len,
                           .response_topic = mm->response_topic, .corr = mm->corr,
                           .corr_len = mm->corr_len, .claim_template = mm->claim_template,
                           .cert_serial = mm->cert_serial};
        if (fm_registry_submit(s->registry, &in) != 0)
            fm_logkv(FM_LOG_WARN, "serve", "registry queue full; message dropped", "topic",
                     mm->topic, NULL);
        return;
    }
    fm_logkv(FM_LOG_WARN, "serve", "ignoring message on unexpected topic", "topic", mm->topic,
             NULL);
}

static void on_connect(void *ud)
{
    server *s = ud;
    if (s->registry)
        fm_registry_resync(s->registry);
}

static void health(void *ud, fm_health *h)
{
    server *s = ud;
    fm_mqtt *c = atomic_load(&s->mqtt);
    if (s->broker) {
        h->broker_pid = (int)fm_broker_pid(s->broker);
        h->broker_up = h->broker_pid > 0;
    } else {
        h->broker_up = 1; /* external broker: judged by the MQTT connection */
    }
    h->mqtt_connected = c ? fm_mqtt_connected(c) : 0;
    h->store_ok = s->pipeline ? fm_pipeline_healthy(s->pipeline) : 0;
    h->model_loaded = s->pipeline != NULL;
    snprintf(h->model, sizeof h->model, "%s", s->pipeline ? fm_pipeline_model(s->pipeline) : "");
}

static void resolve_model_dir(fm_config *cfg)
{
    if (access(cfg->model_dir, R_OK) == 0 || cfg->model_dir[0] == '/')
        return;
#ifdef FM_DEFAULT_MODEL_DIR
    /* A relative default only works from the source tree; fall back to the
     * model bundled with this build. */
    if (access(FM_DEFAULT_MODEL_DIR, R_OK) == 0)
        snprintf(cfg->model_dir, sizeof cfg->model_dir, "%s", FM_DEFAULT_MODEL_DIR);
#endif
}

static void shutdown_all(server *s)
{
    fm_mqtt *c = atomic_exchange(&s->mqtt, NULL);
    fm_mqtt_stop(c);
    /* HTTP before the pipeline: a predict?store=true request in flight
     * waits for its answer from the still-running pipeline, and no new one
     * can reach a pipeline that is gone. */
    fm_http_stop(s->http);
    s->http = NULL;
    fm_pipeline_stop(s->pipeline);
    s->pipeline = NULL;
    fm_registry_stop(s->registry);
    s->registry = NULL;
    fm_lake_writer_stop(s->lake);
    s->lake = NULL;
    fm_broker_stop(s->broker);
    s->broker = NULL;
    fm_ratelimit_free(s->device_rates);
    s->device_rates = NULL;
}

int fm_cmd_serve(int argc, char **argv)
{
    static server s;
    int rc = fm_cli_config(&argc, argv, &s.cfg);
    if (rc)
        return rc;
    if (argc > 1) {
        fprintf(stderr, "usage: fleetml serve [--data DIR] [--set section.key=value]...\n");
        return 2;
    }
    char probe[PATH_MAX];
    if (access(fm_config_path(&s.cfg, "pki/service.crt", probe, sizeof probe), R_OK) != 0) {
        fprintf(stderr, "fleetml serve: %s is not initialised; run `fleetml init --data %s`\n",
                s.cfg.data_dir, s.cfg.data_dir);
        return 1;
    }
    resolve_model_dir(&s.cfg);

    /* Signals are taken synchronously by the main thread; every thread
     * started below inherits this mask. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    fm_errbuf err;
    fm_mqtt *c = NULL;
    if ((rc = fm_ratelimit_new(&s.device_rates)) != 0)
        goto fail;
    if ((rc = fm_lake_writer_start(&s.cfg, &s.lake, &err)) != 0) {
        fm_logkv(FM_LOG_ERROR, "serve", "lake writer failed to start", "error", err.msg, NULL);
        goto fail;
    }
    fm_pipeline_opts po = {.cfg = &s.cfg, .publish = publish, .committed = committed, .ud = &s};
    if ((rc = fm_pipeline_start(&po, &s.pipeline, &err)) != 0) {
        fm_logkv(FM_LOG_ERROR, "serve", "pipeline failed to start", "error", err.msg, NULL);
        goto fail;
    }
    /* A supervised broker starts empty: no device is connected yet. */
    fm_registry_opts ro = {.cfg = &s.cfg, .publish = publish, .ud = &s,
                           .reset_presence = strcmp(s.cfg.broker_mode, "supervised") == 0};
    if ((rc = fm_registry_start(&ro, &s.registry, &err)) != 0) {
        fm_logkv(FM_LOG_ERROR, "serve", "registry failed to start", "error", err.msg, NULL);
        goto fail;
    }
    if (strcmp(s.cfg.broker_mode, "supervised") == 0 &&
        (rc = fm_broker_start(&s.cfg, &s.broker, &err)) != 0) {
        fm_logkv(FM_LOG_ERROR, "serve", "broker failed to start", "error", err.msg, NULL);
        goto fail;
    }
    static const char *const subs[] = {
        "$share/fleetml/fleet/+/measurements",
        "$share/fleetml/fleet/provisioning/+/request",
        "$share/fleetml/fleet/+/cert/rotate",
        "$share/fleetml/fleet/+/shadow/update",
        "$share/fleetml/fleet/+/shadow/get",
        FM_PRESENCE_SUB,
        FM_ADMISSION_TOPIC,
        NULL,
    };
    fm_mqtt_handlers mh = {.on_message = on_message, .on_connect = on_connect, .ud = &s};
    if ((rc = fm_mqtt_start(&s.cfg, subs, &mh, &c, &err)) != 0) {
        fm_logkv(FM_LOG_ERROR, "serve", "MQTT client failed to start", "error", err.msg, NULL);
        goto fail;
    }
    atomic_store(&s.mqtt, c);
    fm_http_opts ho = {.cfg = &s.cfg, .health = health, .ud = &s, .pipeline = s.pipeline};
    if ((rc = fm_http_start(&ho, &s.http, &err)) != 0) {
        fm_logkv(FM_LOG_ERROR, "serve", "HTTP failed to start", "error", err.msg, NULL);
        goto fail;
    }
    char port[16];
    snprintf(port, sizeof port, "%d", s.cfg.broker_port);
    fm_logkv(FM_LOG_INFO, "serve", "fleetml serving", "node", s.cfg.node_id, "data",
             s.cfg.data_dir, "mqtt_port", port, NULL);

    for (;;) {
        int sig = 0;
        if (sigwait(&set, &sig) != 0)
            continue;
        if (sig == SIGHUP) {
            fm_logf(FM_LOG_INFO, "serve", "SIGHUP ignored (restart to apply configuration)");
            continue;
        }
        fm_logf(FM_LOG_INFO, "serve", "signal %d: shutting down", sig);
        break;
    }
    shutdown_all(&s);
    fm_logf(FM_LOG_INFO, "serve", "stopped");
    return 0;
fail:
    shutdown_all(&s);
    return 1;
}
