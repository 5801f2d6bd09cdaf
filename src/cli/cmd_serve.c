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
#include "fleetml/ingest.h"
#include "fleetml/metrics.h"
#include "fleetml/mqtt.h"
#include "fleetml/pipeline.h"
#include "fleetml/modelreg.h"
#include "fleetml/registry.h"

#include "fleetml/functions.h"
#include "fleetml/rules.h"

#include <pthread.h>
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
    fm_deployer *deployer;
    fm_ingest *ingest;
    fm_fn_registry *functions;
    fm_lake *rules_lake;
    fm_rules *rules;
    /* The MQTT client: NULL until it has started, then set once. Shutdown
     * halts it first (publishes from the pipeline, registry and rules get
     * FM_EUNAVAIL from then on) and frees it last, once every thread that
     * could publish has stopped; so users need no lock against it. */
    _Atomic(fm_mqtt *) mqtt;
} server;

static int publish(void *ud, const char *topic, const void *payload, size_t len,
                   const void *corr, size_t corr_len)
{
    fm_mqtt *c = atomic_load_explicit(&((server *)ud)->mqtt, memory_order_acquire);
    return c ? fm_mqtt_publish(c, topic, payload, len, corr, corr_len) : FM_EUNAVAIL;
}

/* The deployer's tables go to the pipeline. */
static void serving_publish(void *ud, fm_serving *t)
{
    fm_pipeline_set_serving(((server *)ud)->pipeline, t);
}

static uint64_t serving_in_use(void *ud)
{
    return fm_pipeline_serving_in_use(((server *)ud)->pipeline);
}

static size_t serving_take_drift(void *ud, fm_drift_counts **out)
{
    return fm_pipeline_drift_take(((server *)ud)->pipeline, out);
}

/* The registry saw a device change: the pipeline's cached rows go. */
static void device_changed(void *ud, const char *device_id)
{
    (void)device_id;
    fm_pipeline_devices_changed(((server *)ud)->pipeline);
}

static void committed(void *ud)
{
    server *s = ud;
    if (s->lake)
        fm_lake_writer_notify(s->lake);
}

/* Each message goes to the ingest router (on the MQTT network thread). */
static void on_message(void *ud, const fm_mqtt_msg *m)
{
    server *s = ud;
    fm_ingest_on_message(s->ingest, m);
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
    if (s->broker) {
        h->broker_pid = (int)fm_broker_pid(s->broker);
        h->broker_up = h->broker_pid > 0;
    } else {
        h->broker_up = 1; /* external broker: judged by the MQTT connection */
    }
    fm_mqtt *c = atomic_load_explicit(&s->mqtt, memory_order_acquire);
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
    /* No message comes in after this; publishes answer FM_EUNAVAIL. */
    fm_mqtt *c = atomic_load_explicit(&s->mqtt, memory_order_acquire);
    fm_mqtt_halt(c);
    /* HTTP before the pipeline: a predict?store=true request in flight
     * waits for its answer from the still-running pipeline, and no new one
     * can reach a pipeline that is gone. */
    fm_http_stop(s->http);
    s->http = NULL;
    /* Rules deliver to functions, the lake and shadows: stopped before
     * them. */
    fm_rules_stop(s->rules);
    s->rules = NULL;
    fm_lake_close(s->rules_lake);
    s->rules_lake = NULL;
    /* The deployer delivers to the pipeline: stop it first; its models
     * are freed once the pipeline no longer scores (after its stop). */
    fm_deployer *d = s->deployer;
    s->deployer = NULL;
    fm_deployer_halt(d);
    fm_pipeline_stop(s->pipeline);
    s->pipeline = NULL;
    /* After the pipeline: processor functions answer in its reply path. */
    fm_fn_registry_close(s->functions);
    s->functions = NULL;
    fm_deployer_stop(d);
    fm_registry_stop(s->registry);
    s->registry = NULL;
    fm_lake_writer_stop(s->lake);
    s->lake = NULL;
    fm_broker_stop(s->broker);
    s->broker = NULL;
    fm_ingest_free(s->ingest);
    s->ingest = NULL;
    /* Every thread that could publish has stopped. */
    atomic_store_explicit(&s->mqtt, NULL, memory_order_release);
    fm_mqtt_stop(c);
}

int fm_cmd_serve(int argc, char **argv)
{
    static server s;
    int rc = fm_cli_config(&argc, argv, &s.cfg);
    if (rc)
        return rc;
    if (argc > 1) {
        return fm_cli_usage_error("serve", "unexpected argument '%s'", argv[1]);
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
    if ((rc = fm_lake_writer_start(&s.cfg, &s.lake, &err)) != 0) {
        fm_logkv(FM_LOG_ERROR, "serve", "lake writer failed to start", "error", err.msg, NULL);
        goto fail;
    }
    /* Functions first: a processor function answers in the pipeline's reply
     * path, and rules call them. */
    char fn_logs[PATH_MAX];
    fm_config_path(&s.cfg, "log/functions", fn_logs, sizeof fn_logs);
    if ((rc = fm_fn_registry_open(s.cfg.functions_dir, fn_logs, &s.functions, &err)) != 0) {
        fm_logkv(FM_LOG_ERROR, "serve", "functions failed to start", "error", err.msg, NULL);
        goto fail;
    }
    fm_pipeline_opts po = {.cfg = &s.cfg, .publish = publish, .committed = committed, .ud = &s,
                           .functions = s.functions};
    if ((rc = fm_pipeline_start(&po, &s.pipeline, &err)) != 0) {
        fm_logkv(FM_LOG_ERROR, "serve", "pipeline failed to start", "error", err.msg, NULL);
        goto fail;
    }
    fm_model *base = fm_pipeline_base_model(s.pipeline);
    fm_serving_sink sink = {.publish = serving_publish, .in_use = serving_in_use,
                            .take_drift = serving_take_drift, .ud = &s};
    if ((rc = fm_deployer_start(&s.cfg, fm_model_name(base), base, fm_pipeline_model(s.pipeline),
                                &sink, &s.deployer, &err)) != 0) {
        fm_logkv(FM_LOG_ERROR, "serve", "model deployer failed to start", "error", err.msg, NULL);
        goto fail;
    }
    /* A supervised broker starts empty: no device is connected yet. */
    fm_registry_opts ro = {.cfg = &s.cfg, .publish = publish, .ud = &s,
                           .reset_presence = strcmp(s.cfg.broker_mode, "supervised") == 0,
                           .device_changed = device_changed};
    if ((rc = fm_registry_start(&ro, &s.registry, &err)) != 0) {
        fm_logkv(FM_LOG_ERROR, "serve", "registry failed to start", "error", err.msg, NULL);
        goto fail;
    }
    if (strcmp(s.cfg.broker_mode, "supervised") == 0 &&
        (rc = fm_broker_start(&s.cfg, &s.broker, &err)) != 0) {
        fm_logkv(FM_LOG_ERROR, "serve", "broker failed to start", "error", err.msg, NULL);
        goto fail;
    }
    fm_ingest_opts io = {.cfg = &s.cfg, .pipeline = s.pipeline, .registry = s.registry,
                         .publish = publish, .ud = &s};
    if ((rc = fm_ingest_new(&io, &s.ingest)) != 0) {
        fm_logf(FM_LOG_ERROR, "serve", "out of memory");
        goto fail;
    }
    fm_mqtt_handlers mh = {.on_message = on_message, .on_connect = on_connect, .ud = &s};
    if ((rc = fm_mqtt_start(&s.cfg, fm_ingest_subscriptions(), &mh, &c, &err)) != 0) {
        fm_logkv(FM_LOG_ERROR, "serve", "MQTT client failed to start", "error", err.msg, NULL);
        goto fail;
    }
    atomic_store_explicit(&s.mqtt, c, memory_order_release);
    /* Rules: their own lake handle (dead letters, lake targets) and store
     * connection. */
    if ((rc = fm_lake_open(&s.cfg, &s.rules_lake, &err)) != 0) {
        fm_logkv(FM_LOG_ERROR, "serve", "rules failed to start", "error", err.msg, NULL);
        goto fail;
    }
    fm_rules_opts rop = {.cfg = &s.cfg, .lake = s.rules_lake, .functions = s.functions,
                         .retry_base_ms = s.cfg.rules_retry_base_ms,
                         .loopback_webhooks = strcmp(s.cfg.rules_loopback_webhooks, "on") == 0};
    if ((rc = fm_rules_start(&rop, &s.rules, &err)) != 0) {
        fm_logkv(FM_LOG_ERROR, "serve", "rules engine failed to start", "error", err.msg, NULL);
        goto fail;
    }
    fm_http_opts ho = {.cfg = &s.cfg, .health = health, .ud = &s, .pipeline = s.pipeline,
                       .functions = s.functions};
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

const fm_cli_cmd fm_cli_serve_cmds[] = {
    {.name = "serve",
     .summary = "run the platform on this node (broker, pipeline, lake, HTTP)",
     .text = "Supervises the broker (unless mqtt.external is set), runs the measurement\n"
             "pipeline, the lake export, rules and functions, and serves the HTTP API, the\n"
             "dashboard and the operations endpoint (/metrics, /healthz). Stops cleanly on\n"
             "SIGTERM or SIGINT.",
     .flags = FM_CLI_CONFIG,
     .examples = {"fleetml serve --data /var/lib/fleetml",
                  "fleetml serve --set http.listen=0.0.0.0:8443 --set node.log_level=debug"}},
    {.name = NULL},
};
