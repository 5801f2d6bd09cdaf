/*
 * fleetml-echo: the baseline service for `make bench`.
 *
 * It does what the smallest possible cloud side of the device contract
 * does: take each measurement from the broker (same service client, same
 * mutual TLS, same shared subscription as `fleetml serve`) and answer it on
 * the device's reply topic with {"id": ..., "status": "ok"} — no
 * validation, no storage, no model. The gap between this and `fleetml
 * serve` is the cost of doing the real work.
 *
 *   fleetml-echo --data DIR [--set section.key=value]...
 */
#include "cli/cli.h"
#include "fleetml/mqtt.h"
#include "fleetml/pipeline.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>

static fm_mqtt *client;

/* Finds the top-level "id" string without parsing the document: the
 * baseline must cost as little as possible. Good enough for the
 * simulator's payloads, which put "id" first. */
static int find_id(const char *p, size_t len, char *out, size_t out_len)
{
    const char *key = memmem(p, len, "\"id\"", 4);
    if (!key)
        return 0;
    const char *q = key + 4, *end = p + len;
    while (q < end && (*q == ' ' || *q == ':'))
        q++;
    if (q >= end || *q != '"')
        return 0;
    const char *s = ++q;
    while (q < end && *q != '"')
        q++;
    if (q >= end || (size_t)(q - s) >= out_len)
        return 0;
    memcpy(out, s, (size_t)(q - s));
    out[q - s] = '\0';
    return 1;
}

static void on_message(void *ud, const fm_mqtt_msg *m)
{
    (void)ud;
    /* fleet/<device>/measurements */
    const char *dev = m->topic + 6, *slash = strchr(dev, '/');
    char device[80], id[80], topic[256], reply[160];
    if (strncmp(m->topic, "fleet/", 6) != 0 || !slash || (size_t)(slash - dev) >= sizeof device)
        return;
    snprintf(device, sizeof device, "%.*s", (int)(slash - dev), dev);
    if (!find_id(m->payload, m->len, id, sizeof id))
        id[0] = '\0';
    fm_reply_topic(device, m->response_topic, "results", topic, sizeof topic);
    int n = snprintf(reply, sizeof reply, "{\"id\":\"%s\",\"status\":\"ok\"}", id);
    fm_mqtt_publish(client, topic, reply, (size_t)n, m->corr, m->corr_len);
}

int main(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
    static const char *const subs[] = {"$share/fleetml/fleet/+/measurements", NULL};
    fm_mqtt_handlers h = {.on_message = on_message};
    fm_errbuf err;
    if (fm_mqtt_start(&cfg, subs, &h, &client, &err) != 0) {
        fprintf(stderr, "fleetml-echo: %s\n", err.msg);
        return 1;
    }
    int sig;
    sigwait(&set, &sig);
    fm_mqtt_stop(client);
    return 0;
}
