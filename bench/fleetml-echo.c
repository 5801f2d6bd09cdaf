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
 * With --durable FILE it is the physical limit of a durable-first reply
 * instead: each payload is appended to FILE and answered only after
 * fdatasync, with ideal group commit (one writer thread; the next batch is
 * whatever arrived during the previous fdatasync; no fixed wait), and still
 * no parsing beyond the id, no database, no model. The gap between this and
 * `fleetml serve` is what fleetml adds on top of the disk.
 *
 *   fleetml-echo --data DIR [--durable FILE] [--set section.key=value]...
 */
#include "cli/cli.h"
#include "fleetml/mqtt.h"
#include "fleetml/pipeline.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static fm_mqtt *client;

/* Durable mode: replies waiting for the next fdatasync. */
typedef struct pending {
    struct pending *next;
    char topic[256];
    char reply[160];
    size_t reply_len;
    void *corr;
    size_t corr_len;
    size_t len;
    char payload[]; /* len bytes */
} pending;

static struct {
    int fd; /* -1: not durable */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pending *head, **tail;
    int stopping;
    pthread_t thread;
} durable = {.fd = -1, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

/* Takes everything queued, appends it, fdatasyncs, then replies. */
static void *durable_writer(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&durable.mu);
    for (;;) {
        while (!durable.head && !durable.stopping)
            pthread_cond_wait(&durable.cv, &durable.mu);
        pending *batch = durable.head;
        if (!batch)
            break;
        durable.head = NULL;
        durable.tail = &durable.head;
        pthread_mutex_unlock(&durable.mu);
        for (pending *p = batch; p; p = p->next)
            if (write(durable.fd, p->payload, p->len) != (ssize_t)p->len)
                perror("fleetml-echo: write");
        if (fdatasync(durable.fd) != 0)
            perror("fleetml-echo: fdatasync");
        while (batch) {
            pending *next = batch->next;
            fm_mqtt_publish(client, batch->topic, batch->reply, batch->reply_len, batch->corr,
                            batch->corr_len);
            free(batch->corr);
            free(batch);
            batch = next;
        }
        pthread_mutex_lock(&durable.mu);
    }
    pthread_mutex_unlock(&durable.mu);
    return NULL;
}

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
    if (durable.fd < 0) {
        fm_mqtt_publish(client, topic, reply, (size_t)n, m->corr, m->corr_len);
        return;
    }
    pending *p = malloc(sizeof *p + m->len);
    if (!p)
        return;
    memcpy(p->payload, m->payload, m->len);
    p->len = m->len;
    snprintf(p->topic, sizeof p->topic, "%s", topic);
    memcpy(p->reply, reply, (size_t)n);
    p->reply_len = (size_t)n;
    p->corr = NULL;
    p->corr_len = 0;
    if (m->corr_len && (p->corr = malloc(m->corr_len))) {
        memcpy(p->corr, m->corr, m->corr_len);
        p->corr_len = m->corr_len;
    }
    p->next = NULL;
    pthread_mutex_lock(&durable.mu);
    *durable.tail = p;
    durable.tail = &p->next;
    pthread_cond_signal(&durable.cv);
    pthread_mutex_unlock(&durable.mu);
}

int main(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    const char *file = fm_cli_take_opt(&argc, argv, "--durable");
    durable.tail = &durable.head;
    if (file) {
        durable.fd = open(file, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        if (durable.fd < 0 || pthread_create(&durable.thread, NULL, durable_writer, NULL) != 0) {
            perror("fleetml-echo: --durable");
            return 1;
        }
    }
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
    if (durable.fd >= 0) {
        pthread_mutex_lock(&durable.mu);
        durable.stopping = 1;
        pthread_cond_signal(&durable.cv);
        pthread_mutex_unlock(&durable.mu);
        pthread_join(durable.thread, NULL);
        close(durable.fd);
    }
    return 0;
}
