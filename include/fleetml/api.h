/*
 * HTTP listener (libmicrohttpd): health, readiness and metrics now; the
 * user-facing API v1 is added here later.
 *
 *   GET /healthz  200 {"status":"ok","version":..,"node":..,"broker_pid":..}
 *                 as long as the process is alive and serving
 *   GET /readyz   200 when the platform can accept measurements, else 503;
 *                 {"ready":bool,"checks":{"broker":..,"mqtt":..,"store":..,
 *                  "model":..},"model":"name@version"}
 *   GET /metrics  Prometheus text format (version 0.0.4)
 */
#ifndef FLEETML_API_H
#define FLEETML_API_H

#include "fleetml/config.h"
#include "fleetml/core.h"

typedef struct fm_health {
    int broker_pid;     /* 0 when the broker is down or external */
    int broker_up;
    int mqtt_connected;
    int store_ok;
    int model_loaded;
    char model[128];
} fm_health;

/* Fills *out with the current state; called on the HTTP thread. */
typedef void (*fm_health_fn)(void *ud, fm_health *out);

typedef struct fm_http fm_http;

/* Starts the listener on cfg->http_bind:http_port. Returns 0 and *out, or
 * FM_EINVAL (bad address) / FM_EIO (cannot listen) with err set. */
int fm_http_start(const fm_config *cfg, fm_health_fn health, void *ud, fm_http **out,
                  fm_errbuf *err);
void fm_http_stop(fm_http *h);

#endif
