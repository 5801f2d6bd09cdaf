/*
 * Pipeline: worker threads parse, validate and extract features of each
 * message as it arrives (CPU work that needs no shared state); one commit
 * thread then batches prepared messages, checks devices and duplicates,
 * scores the whole batch with one model call, and commits measurement +
 * result rows in one transaction before replying.
 *
 * Group commit, as databases do it: the thread takes whatever is queued (up
 * to batch_max) and commits it at once, so a lone message never waits for
 * company; under load, the messages that arrived while one commit was
 * fsyncing form the next batch, which is what amortises fsync. An optional
 * window (pipeline.commit_window_us, 0 by default) makes a batch that is
 * not full wait at most that long for more, counted from the oldest
 * message's arrival: an upper bound, for disks whose fsync costs more than
 * the wait.
 */
#include "fleetml/pipeline.h"
#include "fleetml/jsonmem.h"
#include "fleetml/measurement.h"
#include "fleetml/metrics.h"
#include "fleetml/model.h"
#include "fleetml/store.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define MAX_WORKERS 16
#define QUARANTINE_MAX (16 * 1024)

/* Device rows cached by the commit thread: a registry read per
 * measurement costs more than the rest of the dedupe step. Entries live
 * DEVICE_TTL_NS; a disabled or revoked device is also cut off by the
 * broker at once, so the cache only bounds how long a measurement already
 * in flight may still be accepted. */
#define DEVICE_CACHE 1024 /* slots, power of two */
#define DEVICE_TTL_NS (1000ull * 1000000ull)

typedef struct cached_device {
    fm_device dev;
    uint64_t fetched_ns; /* 0 = empty */
} cached_device;

/* What a worker computed for one message, owned by the message. */
typedef struct prepared {
    int parse_rc;      /* 0, or FM_EINVAL/FM_ENOMEM with verr set */
    int feat_rc;       /* 0, or non-zero with verr set (only when parse_rc == 0) */
    fm_measurement m;
    fm_verr verr;
    float feat[FM_FEATURES_MAX];
} prepared;

struct fm_pipeline {
    fm_pipeline_opts opts;
    fm_config cfg;
    fm_store *store;
    fm_model *model;
    char model_ref[128];

    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    fm_inmsg *head, *tail; /* prepared, waiting for the commit thread */
    long depth;
    int stopping;
    _Atomic int healthy;
    _Atomic long bytes; /* payload bytes held by both stages */
    cached_device *devices; /* DEVICE_CACHE slots, commit thread only */

    /* Worker stage (absent when cfg.pipeline_workers == 0). */
    int nworkers;
    pthread_t workers[MAX_WORKERS];
    pthread_mutex_t in_mu;
    pthread_cond_t in_cv;
    fm_inmsg *in_head, *in_tail;
    long in_depth;
    int in_stopping;
};

/* Per-message working state for one batch. */
typedef struct item {
    fm_inmsg *msg;
    fm_measurement m;
    fm_device dev;
    fm_verr verr;
    int rejected;     /* error reply, quarantined */
    int duplicate;    /* already stored: reply with stored result */
    int follower;     /* same id as an earlier item in this batch */
    size_t leader;    /* index of that earlier item */
    size_t row;       /* row in the feature matrix */
    char *result;     /* reply document (fm_free) */
} item;

fm_inmsg *fm_inmsg_new(const char *device_id, const void *payload, size_t len,
                       const char *response_topic, const void *corr, size_t corr_len)
{
    fm_inmsg *m = fm_calloc(1, sizeof *m);
    if (!m)
        return NULL;
    snprintf(m->device_id, sizeof m->device_id, "%s", device_id);
    m->payload = fm_malloc(len + 1);
    if (!m->payload)
        goto fail;
    if (len)
        memcpy(m->payload, payload, len);
    m->payload[len] = '\0';
    m->len = len;
    if (response_topic && !(m->response_topic = fm_strdup(response_topic)))
        goto fail;
    if (corr && corr_len) {
        if (!(m->corr = fm_malloc(corr_len)))
            goto fail;
        memcpy(m->corr, corr, corr_len);
        m->corr_len = corr_len;
    }
    m->recv_ns = fm_mono_ns();
    m->recv_ms = fm_wall_ms();
    return m;
fail:
    fm_inmsg_free(m);
    return NULL;
}

void fm_inmsg_free(fm_inmsg *m)
{
    if (!m)
        return;
    if (m->reply) /* never answered: tell the waiter */
        m->reply(m->reply_ud, NULL, 0);
    if (m->prep) {
        prepared *pr = m->prep;
        fm_measurement_free(&pr->m);
        fm_free(pr);
    }
    fm_free(m->payload);
    fm_free(m->response_topic);
    fm_free(m->corr);
    fm_free(m);
}

char *fm_reply_topic(const char *device_id, const char *rt, const char *default_leaf, char *buf,
                     size_t len)
{
    char prefix[80];
    int n = snprintf(prefix, sizeof prefix, "fleet/%s/", device_id);
    if (rt && strncmp(rt, prefix, (size_t)n) == 0 && rt[n] != '\0' && !strpbrk(rt, "+#") &&
        strlen(rt) < len) {
        snprintf(buf, len, "%s", rt);
        return buf;
    }
    snprintf(buf, len, "fleet/%s/%s", device_id, default_leaf);
    return buf;
}

char *fm_error_result_json(const char *mid, const char *code, const char *message)
{
    json_t *doc = json_pack("{s:s, s:s, s:{s:s, s:s}}", "id", mid ? mid : "", "status", "error",
                            "error", "code", code, "message", message);
    if (!doc)
        return NULL;
    char *s = json_dumps(doc, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(doc);
    return s;
}

/* Rounds to a fixed number of decimals so results are stable and compact. */
static double round_to(double v, int decimals)
{
    double f = pow(10.0, decimals);
    return round(v * f) / f;
}

char *fm_result_ok_json(const fm_model *model, const char *model_ref, const char *mid,
                        const float *out, int64_t recv_ms)
{
    char ts[40];
    json_t *outputs = json_object();
    if (!outputs)
        return NULL;
    size_t n = fm_model_output_count(model);
    for (size_t i = 0; i < n; i++) {
        const fm_model_output *o = fm_model_output_at(model, i);
        json_object_set_new(outputs, o->name, json_real(round_to(out[i], 3)));
    }
    json_t *doc = json_pack("{s:s, s:s, s:s, s:o, s:s}", "id", mid, "status", "ok", "model",
                            model_ref, "outputs", outputs, "received_at",
                            fm_rfc3339(recv_ms, ts, sizeof ts));
    if (!doc)
        return NULL;
    char *s = json_dumps(doc, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10));
    json_decref(doc);
    return s;
}

static void reject(item *it, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void reject(item *it, const char *code, const char *fmt, ...)
{
    it->rejected = 1;
    snprintf(it->verr.code, sizeof it->verr.code, "%s", code);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(it->verr.message, sizeof it->verr.message, fmt, ap);
    va_end(ap);
}

/* The CPU-heavy part of a message's processing, done by a worker (or by
 * the commit thread when there are no workers): size check, parse and
 * validation, feature extraction. Never touches the store or the model.
 * Returns 0 or FM_ENOMEM (the message is then answered "internal"). */
static int prepare(const fm_pipeline *p, fm_inmsg *msg)
{
    if (msg->prep)
        return 0;
    uint64_t t0 = fm_mono_ns();
    fm_stage_observe(FM_STAGE_QUEUE, msg->recv_ns);
    prepared *pr = fm_calloc(1, sizeof *pr);
    if (!pr)
        return FM_ENOMEM;
    if ((int64_t)msg->len > p->cfg.max_payload) {
        pr->parse_rc = fm_verrf(&pr->verr, FM_VERR_TOO_LARGE,
                                "payload is %zu bytes, the limit is %d bytes", msg->len,
                                p->cfg.max_payload);
    } else {
        pr->parse_rc = fm_measurement_parse(msg->payload, msg->len, &pr->m, &pr->verr);
        if (pr->parse_rc == 0)
            pr->feat_rc = fm_features_extract(&pr->m, pr->feat, &pr->verr);
    }
    msg->prep = pr;
    fm_stage_observe(FM_STAGE_PREPARE, t0);
    msg->prepared_ns = fm_mono_ns();
    return 0;
}

static uint32_t id_hash(const char *s)
{
    uint32_t h = 2166136261u;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 16777619u;
    return h;
}

/* The device row from the cache, or from the store (then cached). Only
 * found devices are cached, so a newly registered one is seen at once. */
static int device_lookup(fm_pipeline *p, const char *id, fm_device *out)
{
    uint64_t now = fm_mono_ns();
    cached_device *c = p->devices ? &p->devices[id_hash(id) & (DEVICE_CACHE - 1)] : NULL;
    if (c && c->fetched_ns && now - c->fetched_ns < DEVICE_TTL_NS &&
        strcmp(c->dev.id, id) == 0) {
        *out = c->dev;
        return 0;
    }
    int rc = fm_store_device_get(p->store, id, out);
    if (rc == 0 && c) {
        c->dev = *out;
        c->fetched_ns = now;
    }
    return rc;
}

/* Validation, device check and dedupe for one message. */
static void admit(fm_pipeline *p, item *items, size_t i)
{
    item *it = &items[i];
    fm_inmsg *msg = it->msg;
    int rc = device_lookup(p, msg->device_id, &it->dev);
    if (rc == FM_ENOTFOUND) {
        reject(it, FM_VERR_UNKNOWN_DEVICE, "device '%s' is not registered", msg->device_id);
        return;
    }
    if (rc != 0) {
        reject(it, FM_VERR_UNAVAILABLE, "device registry unavailable, retry later");
        return;
    }
    if (it->dev.status != FM_DEVICE_ACTIVE) {
        reject(it, FM_VERR_DEVICE_INACTIVE, "device '%s' is %s", msg->device_id,
               it->dev.status == FM_DEVICE_REVOKED ? "revoked" : "disabled");
        return;
    }
    prepared *pr = msg->prep;
    if (pr->parse_rc != 0) {
        it->verr = pr->verr;
        it->rejected = 1;
        return;
    }
    /* The measurement now belongs to the batch item. */
    it->m = pr->m;
    memset(&pr->m, 0, sizeof pr->m);
    /* An id already stored is answered with its original result. */
    char *stored = NULL;
    rc = fm_store_result_lookup(p->store, msg->device_id, it->m.id, &stored);
    if (rc == 0) {
        it->duplicate = 1;
        it->result = stored;
        return;
    }
    if (rc != FM_ENOTFOUND) {
        reject(it, FM_VERR_UNAVAILABLE, "store unavailable, retry later");
        return;
    }
    for (size_t j = 0; j < i; j++) {
        item *o = &items[j];
        if (!o->rejected && !o->duplicate && !o->follower &&
            strcmp(o->msg->device_id, msg->device_id) == 0 && strcmp(o->m.id, it->m.id) == 0) {
            it->follower = 1;
            it->leader = j;
            return;
        }
    }
}

static void count_reject(const item *it)
{
    fm_metrics *mx = fm_metrics_get();
    atomic_fetch_add(&mx->rejected[fm_reject_reason_from_code(it->verr.code)], 1);
}

static void publish_reply(fm_pipeline *p, const item *it, const char *doc)
{
    char topic[256];
    fm_inmsg *msg = it->msg;
    int rc = 0;
    if (msg->reply) {
        msg->reply(msg->reply_ud, doc, strlen(doc));
        msg->reply = NULL;
    } else {
        fm_reply_topic(msg->device_id, msg->response_topic, "results", topic, sizeof topic);
        rc = p->opts.publish(p->opts.ud, topic, doc, strlen(doc), msg->corr, msg->corr_len);
    }
    fm_metrics *mx = fm_metrics_get();
    if (rc == 0)
        atomic_fetch_add(&mx->replied, 1);
    fm_hist_observe(&mx->reply_seconds, (double)(fm_mono_ns() - msg->recv_ns) / 1e9);
}

static void process_batch(fm_pipeline *p, fm_inmsg *list, size_t n)
{
    fm_metrics *mx = fm_metrics_get();
    size_t nf = fm_feature_count(), no = fm_model_output_count(p->model);
    item *items = fm_calloc(n, sizeof *items);
    float *feat = fm_malloc(n * nf * sizeof(float));
    float *pred = fm_malloc(n * no * sizeof(float));
    fm_record *recs = fm_calloc(n, sizeof *recs);
    fm_quarantine *quar = fm_calloc(n, sizeof *quar);
    if (!items || !feat || !pred || !recs || !quar) {
        /* Out of memory: nothing can be stored; devices will retry. */
        fm_logf(FM_LOG_ERROR, "pipeline", "out of memory processing a batch of %zu", n);
        while (list) {
            fm_inmsg *next = list->next;
            atomic_fetch_sub(&p->bytes, (long)list->len);
            fm_inmsg_free(list);
            list = next;
        }
        fm_free(items);
        fm_free(feat);
        fm_free(pred);
        fm_free(recs);
        fm_free(quar);
        return;
    }

    size_t i = 0, rows = 0;
    uint64_t t_admit = fm_mono_ns();
    for (fm_inmsg *m = list; m; m = m->next, i++) {
        items[i].msg = m;
        atomic_fetch_add(&mx->received, 1);
        if (m->prep)
            fm_stage_observe(FM_STAGE_HANDOFF, m->prepared_ns);
        if (prepare(p, m) != 0) {
            reject(&items[i], FM_VERR_INTERNAL, "out of memory, retry later");
            continue;
        }
        admit(p, items, i);
        if (items[i].rejected || items[i].duplicate || items[i].follower)
            continue;
        prepared *pr = m->prep;
        if (pr->feat_rc != 0) {
            items[i].verr = pr->verr;
            items[i].rejected = 1;
            continue;
        }
        memcpy(feat + rows * nf, pr->feat, nf * sizeof(float));
        items[i].row = rows++;
    }
    fm_stage_observe(FM_STAGE_ADMIT, t_admit);

    int model_ok = 1;
    if (rows > 0) {
        fm_errbuf err;
        uint64_t t0 = fm_mono_ns();
        if (fm_model_predict(p->model, feat, rows, pred, &err) != 0) {
            fm_logf(FM_LOG_ERROR, "pipeline", "inference failed: %s", err.msg);
            model_ok = 0;
        }
        fm_hist_observe(&mx->inference_seconds, (double)(fm_mono_ns() - t0) / 1e9);
    }

    /* Build the rows to commit. */
    size_t nr = 0, nq = 0;
    for (i = 0; i < n; i++) {
        item *it = &items[i];
        if (it->duplicate || it->follower)
            continue;
        if (!it->rejected && !model_ok)
            reject(it, FM_VERR_INTERNAL, "model inference failed, retry later");
        if (it->rejected) {
            if (strcmp(it->verr.code, FM_VERR_UNAVAILABLE) == 0 ||
                strcmp(it->verr.code, FM_VERR_INTERNAL) == 0)
                continue; /* our fault, not the payload's: nothing to quarantine */
            /* Quarantine keeps evidence, not whole floods: at most the
             * first QUARANTINE_MAX bytes of a payload are kept. */
            if (it->msg->len > QUARANTINE_MAX) {
                size_t ml = strlen(it->verr.message);
                snprintf(it->verr.message + ml, sizeof it->verr.message - ml,
                         " [quarantined: first %d of %zu bytes]", QUARANTINE_MAX, it->msg->len);
            }
            quar[nq++] = (fm_quarantine){
                .device_id = it->msg->device_id,
                .tenant = it->dev.tenant,
                .received_ms = it->msg->recv_ms,
                .payload = it->msg->payload,
                .payload_len = it->msg->len > QUARANTINE_MAX ? QUARANTINE_MAX : it->msg->len,
                .error_code = it->verr.code,
                .error_message = it->verr.message,
            };
            continue;
        }
        it->result = fm_result_ok_json(p->model, p->model_ref, it->m.id, pred + it->row * no,
                                       it->msg->recv_ms);
        if (!it->result) {
            reject(it, FM_VERR_INTERNAL, "out of memory, retry later");
            continue;
        }
        recs[nr++] = (fm_record){
            .device_id = it->msg->device_id,
            .tenant = it->dev.tenant,
            .measurement_id = it->m.id,
            .received_ms = it->msg->recv_ms,
            .taken_ms = it->m.taken_at_ms,
            .payload = it->msg->payload,
            .payload_len = it->msg->len,
            .result_json = it->result,
            .model = p->model_ref,
        };
    }

    int committed = 1;
    if (nr + nq > 0) {
        fm_errbuf err;
        uint64_t t0 = fm_mono_ns();
        int rc = fm_store_commit(p->store, recs, nr, quar, nq, &err);
        fm_hist_observe(&mx->commit_seconds, (double)(fm_mono_ns() - t0) / 1e9);
        if (rc != 0) {
            committed = 0;
            atomic_fetch_add(&mx->commit_failures, 1);
            if (atomic_exchange(&p->healthy, 0))
                fm_logkv(FM_LOG_ERROR, "pipeline", "commit failed; replying unavailable",
                         "error", err.msg, NULL);
            atomic_store(&mx->store_unavailable, 1);
        } else {
            fm_hist_observe(&mx->commit_batch_size, (double)nr);
            atomic_fetch_add(&mx->stored, nr);
            if (!atomic_exchange(&p->healthy, 1))
                fm_logf(FM_LOG_INFO, "pipeline", "commits succeed again");
            atomic_store(&mx->store_unavailable, 0);
            if (p->opts.committed)
                p->opts.committed(p->opts.ud);
        }
    }

    /* Replies go out only now that the batch is durable. */
    uint64_t t_publish = fm_mono_ns();
    for (i = 0; i < n; i++) {
        item *it = &items[i];
        const char *doc = NULL;
        char *owned = NULL;
        if (it->follower) {
            item *lead = &items[it->leader];
            if (committed && !lead->rejected) {
                doc = lead->result;
                atomic_fetch_add(&mx->duplicates, 1);
            } else {
                it->verr = lead->verr;
                if (!committed)
                    snprintf(it->verr.code, sizeof it->verr.code, "%s", FM_VERR_UNAVAILABLE);
                it->rejected = 1;
            }
        } else if (it->duplicate) {
            doc = it->result;
            atomic_fetch_add(&mx->duplicates, 1);
        } else if (!it->rejected && !committed) {
            reject(it, FM_VERR_UNAVAILABLE, "measurement could not be stored, retry later");
        } else if (!it->rejected) {
            doc = it->result;
        }
        if (it->rejected) {
            char mid[FM_MEAS_ID_MAX + 1];
            if (it->m.id[0])
                snprintf(mid, sizeof mid, "%s", it->m.id);
            else
                fm_measurement_peek_id(it->msg->payload, it->msg->len, mid);
            count_reject(it);
            owned = fm_error_result_json(mid, it->verr.code, it->verr.message);
            doc = owned;
        }
        if (doc)
            publish_reply(p, it, doc);
        fm_free(owned);
    }
    fm_stage_observe(FM_STAGE_PUBLISH, t_publish);

    long released = 0;
    for (i = 0; i < n; i++) {
        released += (long)items[i].msg->len;
        fm_measurement_free(&items[i].m);
        fm_free(items[i].result);
        fm_inmsg_free(items[i].msg);
    }
    atomic_fetch_sub(&p->bytes, released);
    fm_free(items);
    fm_free(feat);
    fm_free(pred);
    fm_free(recs);
    fm_free(quar);
}

static void *worker(void *arg);

static void *run(void *arg)
{
    fm_pipeline *p = arg;
    fm_metrics *mx = fm_metrics_get();
    const long batch_max = p->cfg.batch_max;
    const uint64_t window_ns = (uint64_t)p->cfg.commit_window_us * 1000ull;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->head && !p->stopping) {
            if (atomic_load(&p->healthy)) {
                pthread_cond_wait(&p->cv, &p->mu);
                continue;
            }
            /* After a failed commit, probe the store every second so
             * readiness recovers on its own even when no device sends
             * (a load balancer will not send traffic to a 503 node). */
            struct timespec ts;
            fm_deadline_ns(&ts, CLOCK_MONOTONIC, 1000000000LL);
            if (pthread_cond_timedwait(&p->cv, &p->mu, &ts) == ETIMEDOUT && !p->head) {
                pthread_mutex_unlock(&p->mu);
                fm_errbuf err;
                if (fm_store_probe_write(p->store, &err) == 0) {
                    atomic_store(&p->healthy, 1);
                    atomic_store(&mx->store_unavailable, 0);
                    fm_logf(FM_LOG_INFO, "pipeline", "store accepts commits again");
                }
                pthread_mutex_lock(&p->mu);
            }
        }
        if (!p->head && p->stopping)
            break;
        /* Wait for the batch to fill, but never past the window counted
         * from the oldest queued message's arrival. */
        if (window_ns > 0 && p->depth < batch_max && !p->stopping) {
            uint64_t age = fm_mono_ns() - p->head->recv_ns;
            if (age < window_ns) {
                struct timespec ts;
                fm_deadline_ns(&ts, CLOCK_MONOTONIC, (int64_t)(window_ns - age));
                while (p->depth < batch_max && !p->stopping) {
                    if (pthread_cond_timedwait(&p->cv, &p->mu, &ts) == ETIMEDOUT)
                        break;
                }
            }
        }
        fm_inmsg *list = p->head, *last = p->head;
        size_t n = 1;
        while (last->next && (long)n < batch_max) {
            last = last->next;
            n++;
        }
        p->head = last->next;
        if (!p->head)
            p->tail = NULL;
        last->next = NULL;
        /* depth and in_depth are read without the other stage's lock (see
         * submit_counted), so they are written atomically. */
        __atomic_store_n(&p->depth, p->depth - (long)n, __ATOMIC_RELAXED);
        atomic_store(&mx->queue_depth, p->depth);
        pthread_mutex_unlock(&p->mu);
        process_batch(p, list, n);
        pthread_mutex_lock(&p->mu);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

int fm_pipeline_start(const fm_pipeline_opts *opts, fm_pipeline **out, fm_errbuf *err)
{
    fm_pipeline *p = fm_calloc(1, sizeof *p);
    if (!p)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    /* Parses of untrusted payloads use per-thread arenas from now on. */
    fm_jsonmem_install();
    /* Without the cache every lookup goes to the store: slower, still right. */
    p->devices = fm_calloc(DEVICE_CACHE, sizeof *p->devices);
    p->opts = *opts;
    p->cfg = *opts->cfg;
    p->opts.cfg = &p->cfg;
    int rc = fm_store_open(&p->cfg, &p->store, err);
    if (rc)
        goto fail;
    if ((rc = fm_store_hot_path(p->store)) != 0) {
        fm_errf(err, rc, "cannot configure the store");
        goto fail;
    }
    if ((rc = fm_model_load(p->cfg.model_dir, &p->model, err)) != 0)
        goto fail;
    snprintf(p->model_ref, sizeof p->model_ref, "%s@%s", fm_model_name(p->model),
             fm_model_version(p->model));
    pthread_mutex_init(&p->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&p->cv, &ca);
    pthread_condattr_destroy(&ca);
    atomic_store(&p->healthy, 1);
    pthread_mutex_init(&p->in_mu, NULL);
    pthread_cond_init(&p->in_cv, NULL);
    if (pthread_create(&p->thread, NULL, run, p) != 0) {
        rc = fm_errf(err, FM_ENOMEM, "cannot start pipeline thread");
        pthread_cond_destroy(&p->cv);
        pthread_mutex_destroy(&p->mu);
        pthread_cond_destroy(&p->in_cv);
        pthread_mutex_destroy(&p->in_mu);
        goto fail;
    }
    int want = p->cfg.pipeline_workers > MAX_WORKERS ? MAX_WORKERS : p->cfg.pipeline_workers;
    for (int i = 0; i < want; i++) {
        if (pthread_create(&p->workers[i], NULL, worker, p) != 0)
            break; /* fewer workers is still a working pipeline */
        p->nworkers++;
    }
    fm_logkv(FM_LOG_INFO, "pipeline", "started", "model", p->model_ref, NULL);
    *out = p;
    return 0;
fail:
    fm_model_free(p->model);
    fm_store_close(p->store);
    fm_free(p->devices);
    fm_free(p);
    return rc;
}

static int submit_counted(fm_pipeline *p, fm_inmsg *m);

/* Appends a message to the commit thread's queue. Called with p->mu held. */
static void enqueue_ready(fm_pipeline *p, fm_inmsg *m)
{
    m->next = NULL;
    if (p->tail)
        p->tail->next = m;
    else
        p->head = m;
    p->tail = m;
    __atomic_store_n(&p->depth, p->depth + 1, __ATOMIC_RELAXED);
    atomic_store(&fm_metrics_get()->queue_depth,
                 p->depth + __atomic_load_n(&p->in_depth, __ATOMIC_RELAXED));
    /* Wake the thread when the first message arrives or the batch is full;
     * in between it is sleeping out the commit window on purpose. */
    if (p->depth == 1 || p->depth >= p->cfg.batch_max)
        pthread_cond_signal(&p->cv);
}

static void *worker(void *arg)
{
    fm_pipeline *p = arg;
    pthread_mutex_lock(&p->in_mu);
    for (;;) {
        while (!p->in_head && !p->in_stopping)
            pthread_cond_wait(&p->in_cv, &p->in_mu);
        fm_inmsg *m = p->in_head;
        if (!m)
            break; /* stopping and drained */
        p->in_head = m->next;
        if (!p->in_head)
            p->in_tail = NULL;
        pthread_mutex_unlock(&p->in_mu);
        /* A failed allocation leaves the message unprepared; the commit
         * thread tries again and answers "internal" if it fails too. */
        (void)prepare(p, m);
        pthread_mutex_lock(&p->mu);
        enqueue_ready(p, m);
        pthread_mutex_unlock(&p->mu);
        pthread_mutex_lock(&p->in_mu);
        __atomic_store_n(&p->in_depth, p->in_depth - 1, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&p->in_mu);
    return NULL;
}

/* Accounts for a message's payload; FM_EBUSY when it does not fit. */
static int reserve_bytes(fm_pipeline *p, const fm_inmsg *m)
{
    long after = atomic_fetch_add(&p->bytes, (long)m->len) + (long)m->len;
    if (after > p->cfg.queue_max_bytes) {
        atomic_fetch_sub(&p->bytes, (long)m->len);
        return FM_EBUSY;
    }
    return 0;
}

int fm_pipeline_submit(fm_pipeline *p, fm_inmsg *m)
{
    int brc = reserve_bytes(p, m);
    if (brc)
        return brc;
    int rc = submit_counted(p, m);
    if (rc)
        atomic_fetch_sub(&p->bytes, (long)m->len);
    return rc;
}

static int submit_counted(fm_pipeline *p, fm_inmsg *m)
{
    if (p->nworkers == 0) {
        pthread_mutex_lock(&p->mu);
        int rc = p->stopping ? FM_ESTATE : p->depth >= p->cfg.queue_max ? FM_EBUSY : 0;
        if (rc == 0)
            enqueue_ready(p, m);
        pthread_mutex_unlock(&p->mu);
        return rc;
    }
    pthread_mutex_lock(&p->in_mu);
    /* Both stages count against the limit; reading depth without p->mu is
     * a benign race that can only be off by the messages in flight. */
    long total = p->in_depth + __atomic_load_n(&p->depth, __ATOMIC_RELAXED);
    int rc = p->in_stopping ? FM_ESTATE : total >= p->cfg.queue_max ? FM_EBUSY : 0;
    if (rc == 0) {
        m->next = NULL;
        if (p->in_tail)
            p->in_tail->next = m;
        else
            p->in_head = m;
        p->in_tail = m;
        __atomic_store_n(&p->in_depth, p->in_depth + 1, __ATOMIC_RELAXED);
        pthread_cond_signal(&p->in_cv);
    }
    pthread_mutex_unlock(&p->in_mu);
    return rc;
}

int fm_pipeline_healthy(const fm_pipeline *p) { return atomic_load(&p->healthy); }

const char *fm_pipeline_model(const fm_pipeline *p) { return p->model_ref; }

void fm_pipeline_stop(fm_pipeline *p)
{
    if (!p)
        return;
    /* Workers first: they finish what was submitted and hand it on. */
    pthread_mutex_lock(&p->in_mu);
    p->in_stopping = 1;
    pthread_cond_broadcast(&p->in_cv);
    pthread_mutex_unlock(&p->in_mu);
    for (int i = 0; i < p->nworkers; i++)
        pthread_join(p->workers[i], NULL);
    pthread_cond_destroy(&p->in_cv);
    pthread_mutex_destroy(&p->in_mu);
    pthread_mutex_lock(&p->mu);
    p->stopping = 1;
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
    pthread_join(p->thread, NULL);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    fm_model_free(p->model);
    fm_store_close(p->store);
    fm_free(p->devices);
    fm_free(p);
}
