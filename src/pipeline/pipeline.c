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
 *
 * A message that arrives when both stages are empty and the commit thread
 * is waiting skips the workers: the commit thread prepares it itself. At
 * low rates that saves a thread wake-up per message (on two shared cores,
 * ~0.06 ms); under load the workers prepare everything, in parallel, as
 * before.
 */
#include "fleetml/pipeline.h"
#include "fleetml/jsonmem.h"
#include "fleetml/thread.h"
#include "pipeline/batch.h"
#include "fleetml/functions.h"
#include "fleetml/measurement.h"
#include "fleetml/metrics.h"
#include "fleetml/model.h"
#include "fleetml/modelreg.h"
#include "fleetml/drift.h"
#include "fleetml/store.h"

#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define MAX_WORKERS 16

/* Device rows cached by the commit thread: a registry read per
 * measurement costs more than the rest of the dedupe step (at 10
 * measurements/s from 20 devices, when every entry had expired, 60 of the
 * 66 us it took). An entry is read again once any device has changed
 * (fm_pipeline_devices_changed, from the registry's event log, within its
 * 200 ms poll) and at the latest after DEVICE_TTL_NS, should an event be
 * missed. A disabled or revoked device is also cut off by the broker at
 * once, so the cache only bounds how long a measurement already in flight
 * may still be accepted. */
#define DEVICE_CACHE 1024 /* slots, power of two */
#define DEVICE_TTL_NS (60ull * 1000000000ull)

typedef struct cached_device {
    fm_device dev;
    uint64_t fetched_ns; /* 0 = empty */
    uint64_t gen;        /* devices_gen when read */
} cached_device;

/* Slots from PROC_SLOT up are processor functions, not model slots. */
#define PROC_SLOT ((size_t)1 << 40)
#define PROC_MAX 16

struct fm_pipeline {
    fm_pipeline_opts opts;
    fm_config cfg;
    fm_store *store;
    fm_model *model;       /* the bundled model (model.dir): slot 0 of every table */
    char model_ref[128];
    fm_serving *serving;   /* the table in use (commit thread only) */
    _Atomic(fm_serving *) next; /* the newest table from the deployer, not taken yet */
    _Atomic uint64_t serving_gen; /* generation of the table in use */
    /* Live feature counts for drift, per tenant, version and day, taken by
     * the deployer (drift_mu). */
    pthread_mutex_t drift_mu;
    fm_drift_counts *drift;
    size_t ndrift, drift_cap;
    batch_scorer scorer;
    batch_env env;
    /* Processor functions met so far (commit thread only): slot
     * PROC_SLOT + i is procs[i], its results named proc_ref[i]. */
    fm_fn_pool *procs[PROC_MAX];
    char proc_ref[PROC_MAX][80];
    size_t nprocs;

    fm_thread commit;      /* the commit thread; its lock guards head, tail, depth, idle */
    fm_inmsg *head, *tail; /* prepared, waiting for the commit thread */
    long depth;
    bool idle; /* the commit thread is waiting for work */
    /* Keeping the model warm (commit thread only): the slot that scored
     * the last batch, when it came, and the row scored while idle. */
    size_t warm_slot;
    uint64_t last_batch_ns;
    float warm_row[FM_FEATURES_MAX];
    _Atomic int healthy;
    _Atomic long bytes; /* payload bytes held by both stages */
    cached_device *devices; /* DEVICE_CACHE slots, commit thread only */
    _Atomic uint64_t devices_gen; /* bumped when any device changes */

    /* Worker stage (absent when cfg.pipeline_workers == 0). */
    int nworkers;
    pthread_t workers[MAX_WORKERS];
    pthread_mutex_t in_mu;
    pthread_cond_t in_cv;
    fm_inmsg *in_head, *in_tail;
    long in_depth;
    int in_stopping;
};

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

void fm_inmsg_set_reply(fm_inmsg *m, fm_reply_fn fn, void *ud)
{
    m->reply = fn;
    m->reply_ud = ud;
}

void fm_inmsg_set_received(fm_inmsg *m, uint64_t mono_ns, int64_t wall_ms)
{
    m->recv_ns = mono_ns;
    m->recv_ms = wall_ms;
}

void fm_inmsg_free(fm_inmsg *m)
{
    if (!m)
        return;
    if (m->prep) {
        fm_measurement_free(&m->prep->m);
        fm_free(m->prep);
    }
    fm_free(m->payload);
    fm_free(m->response_topic);
    fm_free(m->corr);
    fm_free(m);
}

char *fm_error_result_json(const char *mid, const char *code, const char *message)
{
    /* Messages are at most 255 printable bytes and ids 64: even with every
     * byte escaped the document fits. */
    char buf[2048];
    return fm_error_doc(buf, sizeof buf, mid, code, message) ? fm_strdup(buf) : NULL;
}

char *fm_result_ok_json(const fm_model *model, const char *model_ref, const char *mid,
                        const float *out, int64_t recv_ms)
{
    char ts[40];
    const char *names[FM_OUTPUTS_MAX];
    size_t n = fm_model_output_count(model);
    if (n > FM_OUTPUTS_MAX)
        return NULL;
    for (size_t i = 0; i < n; i++)
        names[i] = fm_model_output_at(model, i)->name;
    return fm_ok_doc(mid, model_ref, names, out, n, fm_rfc3339(recv_ms, ts, sizeof ts));
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
    /* Read before the row: a change landing during the read leaves the
     * entry one generation behind, so it is read again next time. */
    uint64_t gen = atomic_load(&p->devices_gen);
    cached_device *c = p->devices ? &p->devices[id_hash(id) & (DEVICE_CACHE - 1)] : NULL;
    if (c && c->fetched_ns && c->gen == gen && now - c->fetched_ns < DEVICE_TTL_NS &&
        strcmp(c->dev.id, id) == 0) {
        *out = c->dev;
        return 0;
    }
    int rc = fm_store_device_get(p->store, id, out);
    if (rc == 0 && c) {
        c->dev = *out;
        c->fetched_ns = now;
        c->gen = gen;
    }
    return rc;
}

void fm_pipeline_devices_changed(fm_pipeline *p)
{
    atomic_fetch_add(&p->devices_gen, 1);
}

/* batch_env's device lookup: the cache in front of the store. */
static int lookup_device(void *ud, const char *id, fm_device *out)
{
    return device_lookup(ud, id, out);
}

static const fm_serving_slot *slot_of(const fm_pipeline *p, size_t slot)
{
    static const fm_serving_slot none = {0};
    return slot < p->serving->nslots ? &p->serving->slots[slot] : &none;
}

/* The processor slot of a device's group, or FM_SERVING_NONE. */
static size_t proc_slot(fm_pipeline *p, const fm_device *dev)
{
    fm_fn_pool *f = fm_fn_registry_processor(p->opts.functions, FM_MEAS_KIND_V1,
                                             dev->device_group);
    if (!f)
        return FM_SERVING_NONE;
    for (size_t i = 0; i < p->nprocs; i++)
        if (p->procs[i] == f)
            return PROC_SLOT + i;
    if (p->nprocs == PROC_MAX)
        return FM_SERVING_NONE;
    p->procs[p->nprocs] = f;
    snprintf(p->proc_ref[p->nprocs], sizeof p->proc_ref[0], "fn:%s", fm_fn_pool_name(f));
    return PROC_SLOT + p->nprocs++;
}

static size_t scorer_pick(void *ud, const fm_device *dev)
{
    fm_pipeline *p = ud;
    size_t slot = p->opts.functions ? proc_slot(p, dev) : FM_SERVING_NONE;
    return slot != FM_SERVING_NONE ? slot : fm_serving_pick(p->serving, dev->tenant, dev->id);
}

/* A processor function scores each row on its own: the measurement and
 * its features go out, the served model's outputs (by name) come back. A
 * row whose call fails or whose answer lacks an output is NaN: only that
 * device is told to retry. */
static void proc_predict(fm_pipeline *p, fm_fn_pool *f, const float *feat,
                         const char *const *payloads, size_t rows, float *out)
{
    size_t nf = fm_feature_count(), no = fm_model_output_count(p->model);
    for (size_t r = 0; r < rows; r++) {
        float *o = out + r * FM_OUTPUTS_MAX;
        for (size_t k = 0; k < FM_OUTPUTS_MAX; k++)
            o[k] = NAN;
        fm_strbuf b = {0};
        fm_strbuf_printf(&b, "{\"measurement\":%s,\"features\":{", payloads[r]);
        for (size_t i = 0; i < nf; i++)
            fm_strbuf_printf(&b, "%s\"%s\":%.9g", i ? "," : "", fm_feature_name(i),
                             (double)feat[r * nf + i]);
        fm_strbuf_printf(&b, "}}");
        char *req = NULL, *result = NULL;
        size_t len = 0;
        fm_errbuf err = {0};
        if (fm_strbuf_take(&b, &req, &len) != 0)
            continue;
        int rc = fm_fn_call(f, req, &result, NULL, &err);
        fm_free(req);
        if (rc) {
            fm_logkv(FM_LOG_WARN, "pipeline", "processor failed", "function",
                     fm_fn_pool_name(f), "error", err.msg, NULL);
            continue;
        }
        json_t *doc = json_loads(result, 0, NULL);
        json_t *outputs = json_object_get(doc, "outputs");
        bool all = true;
        float vals[FM_OUTPUTS_MAX];
        for (size_t k = 0; k < no && k < FM_OUTPUTS_MAX; k++) {
            json_t *v = json_object_get(outputs, fm_model_output_at(p->model, k)->name);
            all = all && json_is_number(v) && isfinite(json_number_value(v));
            vals[k] = all ? (float)json_number_value(v) : NAN;
        }
        if (all)
            memcpy(o, vals, no * sizeof *o);
        else
            fm_logkv(FM_LOG_WARN, "pipeline", "processor answer lacks the model's outputs",
                     "function", fm_fn_pool_name(f), NULL);
        json_decref(doc);
        fm_free(result);
    }
}

static size_t scorer_shadow_pick(void *ud, const fm_device *dev)
{
    fm_pipeline *p = ud;
    return fm_serving_shadow(p->serving, dev->tenant);
}

static int scorer_predict(void *ud, size_t slot, const float *feat, const char *const *payloads,
                          size_t rows, float *out, fm_errbuf *err)
{
    fm_pipeline *p = ud;
    if (slot >= PROC_SLOT) {
        proc_predict(p, p->procs[slot - PROC_SLOT], feat, payloads, rows, out);
        return 0;
    }
    fm_model *m = slot_of(p, slot)->model;
    if (!m)
        return fm_errf(err, FM_EMODEL, "no model in slot %zu", slot);
    int rc = fm_model_predict(m, feat, rows, out, err);
    if (rc)
        return rc;
    /* Rows come back packed (n outputs each); the batch reads them with a
     * stride of FM_OUTPUTS_MAX. Spread in place from the last row down. */
    size_t no = fm_model_output_count(m);
    for (size_t r = rows; r-- > 0 && no < FM_OUTPUTS_MAX;)
        memmove(out + r * FM_OUTPUTS_MAX, out + r * no, no * sizeof *out);
    return 0;
}

static char *scorer_ok_doc(void *ud, size_t slot, const char *mid, const float *out,
                           int64_t recv_ms)
{
    fm_pipeline *p = ud;
    if (slot >= PROC_SLOT) /* the served model's output names */
        return fm_result_ok_json(p->model, p->proc_ref[slot - PROC_SLOT], mid, out, recv_ms);
    const fm_serving_slot *s = slot_of(p, slot);
    return s->model ? fm_result_ok_json(s->model, s->ref, mid, out, recv_ms) : NULL;
}

static const char *scorer_model_ref(void *ud, size_t slot)
{
    fm_pipeline *p = ud;
    return slot >= PROC_SLOT ? p->proc_ref[slot - PROC_SLOT] : slot_of(p, slot)->ref;
}

/* The counts entry of (tenant, model, day), created when needed; NULL
 * when memory ran out. With drift_mu held. */
static fm_drift_counts *drift_entry(fm_pipeline *p, const char *tenant, const char *model,
                                    int64_t day)
{
    for (size_t i = 0; i < p->ndrift; i++) {
        fm_drift_counts *c = &p->drift[i];
        if (c->day == day && strcmp(c->tenant, tenant) == 0 && strcmp(c->model, model) == 0)
            return c;
    }
    if (p->ndrift == p->drift_cap) {
        size_t cap = p->drift_cap ? p->drift_cap * 2 : 8;
        fm_drift_counts *n = fm_realloc(p->drift, cap * sizeof *n);
        if (!n)
            return NULL;
        p->drift = n;
        p->drift_cap = cap;
    }
    fm_drift_counts *c = &p->drift[p->ndrift++];
    memset(c, 0, sizeof *c);
    snprintf(c->tenant, sizeof c->tenant, "%s", tenant);
    snprintf(c->model, sizeof c->model, "%s", model);
    c->day = day;
    return c;
}

/* Counts the features of the batch's scored measurements into the bins of
 * the version that scored them (versions with a drift baseline only). */
static void count_drift(fm_pipeline *p, const batch *b)
{
    size_t nf = fm_feature_count();
    pthread_mutex_lock(&p->drift_mu);
    for (size_t i = 0; i < b->n; i++) {
        const batch_item *it = &b->items[i];
        if (!it->has_rec)
            continue;
        const fm_serving_slot *s = slot_of(p, it->slot);
        if (!s->model || !fm_model_has_baseline(s->model))
            continue;
        fm_drift_counts *c = drift_entry(p, it->dev.tenant, s->ref,
                                         it->msg->recv_ms / 86400000);
        if (!c)
            break;
        const float *x = b->feat + it->row * nf;
        for (size_t f = 0; f < nf; f++)
            c->counts[f][fm_model_bin(s->model, f, x[f])]++;
        c->n++;
    }
    pthread_mutex_unlock(&p->drift_mu);
}

size_t fm_pipeline_drift_take(fm_pipeline *p, fm_drift_counts **out)
{
    pthread_mutex_lock(&p->drift_mu);
    *out = p->drift;
    size_t n = p->ndrift;
    p->drift = NULL;
    p->ndrift = p->drift_cap = 0;
    pthread_mutex_unlock(&p->drift_mu);
    return n;
}

/* Between batches: takes the deployer's newest table, if any. The batch
 * that ran before finished on the old one. */
static void adopt_serving(fm_pipeline *p)
{
    fm_serving *n = atomic_exchange(&p->next, NULL);
    if (!n)
        return;
    fm_serving_free(p->serving);
    p->serving = n;
    atomic_store(&p->serving_gen, n->generation);
}

void fm_pipeline_set_serving(fm_pipeline *p, fm_serving *s)
{
    /* A table the commit thread has not taken yet is simply replaced. */
    fm_serving_free(atomic_exchange(&p->next, s));
}

uint64_t fm_pipeline_serving_in_use(fm_pipeline *p) { return atomic_load(&p->serving_gen); }

/* Drops messages the pipeline cannot process at all (out of memory). */
static void drop_list(fm_pipeline *p, fm_inmsg *list)
{
    while (list) {
        fm_inmsg *next = list->next;
        atomic_fetch_sub(&p->bytes, (long)list->len);
        if (list->reply) /* never answered: tell the waiter */
            list->reply(list->reply_ud, NULL, 0);
        fm_inmsg_free(list);
        list = next;
    }
}

static void process_batch(fm_pipeline *p, fm_inmsg *list, size_t n)
{
    fm_metrics *mx = fm_metrics_get();
    batch b;
    adopt_serving(p);
    if (batch__init(&b, list, n) != 0) {
        /* Out of memory: nothing can be stored; devices will retry. */
        fm_logf(FM_LOG_ERROR, "pipeline", "out of memory processing a batch of %zu", n);
        drop_list(p, list);
        return;
    }
    batch__admit(&b, &p->env);
    batch__infer(&b, &p->env);
    for (size_t i = 0; i < b.n; i++)
        if (!b.items[i].rejected && b.items[i].slot < PROC_SLOT) {
            p->warm_slot = b.items[i].slot;
            break;
        }
    p->last_batch_ns = fm_mono_ns();
    batch__build_rows(&b, &p->env);
    count_drift(p, &b);
    if (b.nr + b.nq > 0) {
        if (!batch__commit(&b, &p->env)) {
            atomic_fetch_add(&mx->commit_failures, 1);
            if (atomic_exchange(&p->healthy, 0))
                fm_logkv(FM_LOG_ERROR, "pipeline", "commit failed; replying unavailable",
                         "error", b.commit_err.msg, NULL);
            atomic_store(&mx->store_unavailable, 1);
        } else {
            if (!atomic_exchange(&p->healthy, 1))
                fm_logf(FM_LOG_INFO, "pipeline", "commits succeed again");
            atomic_store(&mx->store_unavailable, 0);
            if (p->opts.committed)
                p->opts.committed(p->opts.ud);
        }
    }
    /* Replies go out only now that the batch is durable. */
    batch__reply(&b, &p->env);
    atomic_fetch_sub(&p->bytes, batch__release(&b));
}

static void *worker(void *arg);

/* How long after the last batch the model is kept warm: a fleet that has
 * gone quiet stops costing CPU. */
#define KEEP_WARM_FOR_NS (60ull * 1000000000ull)

/* Waits for work while sparse traffic is flowing, scoring one row with the
 * model of the last batch each time keep_warm_us pass with nothing queued.
 * After an idle gap this machine runs a one-row prediction several times
 * slower than back to back (336 against 27 us; the trees are no longer in
 * the caches, docs/performance.md, "The model kept warm"); one call every
 * 2 ms brings it to ~62 us for 3-5 % of a core while it runs. false when it did not apply
 * (off, never used, or quiet for a minute): the caller waits as usual.
 * Called and returns with the lock held. */
static bool keep_warm_wait(fm_pipeline *p)
{
    fm_thread *t = &p->commit;
    int64_t period = (int64_t)p->cfg.keep_warm_us * 1000;
    if (period <= 0 || !p->last_batch_ns || fm_mono_ns() - p->last_batch_ns > KEEP_WARM_FOR_NS)
        return false;
    if (!fm_thread_wait_ns(t, period) || p->head || fm_thread_should_stop(t))
        return true; /* woken: whatever woke it is handled by the caller */
    fm_model *m = slot_of(p, p->warm_slot)->model;
    if (!m)
        return true;
    fm_thread_unlock(t);
    float out[FM_OUTPUTS_MAX];
    fm_errbuf err;
    if (fm_model_predict(m, p->warm_row, 1, out, &err) == 0)
        atomic_fetch_add(&fm_metrics_get()->keep_warm_calls, 1);
    fm_thread_lock(t);
    return true;
}

static void *run(void *arg)
{
    fm_pipeline *p = arg;
    fm_metrics *mx = fm_metrics_get();
    const long batch_max = p->cfg.batch_max;
    const uint64_t window_ns = (uint64_t)p->cfg.commit_window_us * 1000ull;
    fm_thread *t = &p->commit;
    fm_thread_lock(t);
    for (;;) {
        while (!p->head && !fm_thread_should_stop(t)) {
            p->idle = true;
            if (atomic_load(&p->healthy)) {
                if (!keep_warm_wait(p))
                    fm_thread_wait(t);
                continue;
            }
            /* After a failed commit, probe the store every second so
             * readiness recovers on its own even when no device sends
             * (a load balancer will not send traffic to a 503 node). */
            if (fm_thread_wait_ns(t, 1000000000LL) && !p->head) {
                fm_thread_unlock(t);
                fm_errbuf err;
                if (fm_store_probe_write(p->store, &err) == 0) {
                    atomic_store(&p->healthy, 1);
                    atomic_store(&mx->store_unavailable, 0);
                    fm_logf(FM_LOG_INFO, "pipeline", "store accepts commits again");
                }
                fm_thread_lock(t);
            }
        }
        p->idle = false;
        if (!p->head && fm_thread_should_stop(t))
            break;
        /* Wait for the batch to fill, but never past the window counted
         * from the oldest queued message's arrival. */
        if (window_ns > 0) {
            uint64_t deadline = p->head->recv_ns + window_ns;
            while (p->depth < batch_max && !fm_thread_should_stop(t) &&
                   !fm_thread_wait_ns(t, (int64_t)(deadline - fm_mono_ns())))
                ;
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
        fm_thread_unlock(t);
        process_batch(p, list, n);
        fm_thread_lock(t);
        /* Nothing queued: the store may take its short quiet-writer
         * housekeeping now rather than in a later commit. */
        if (!p->head && !fm_thread_should_stop(t)) {
            fm_thread_unlock(t);
            fm_store_idle(p->store);
            fm_thread_lock(t);
        }
    }
    fm_thread_unlock(t);
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
    /* Every model takes the same features: one realistic row keeps any warm. */
    if ((rc = fm_model_probe_rows(p->warm_row, 1, err)) != 0)
        goto fail;
    /* Until the deployer publishes a table: the bundled model for all. */
    p->serving = fm_calloc(1, sizeof *p->serving);
    if (p->serving)
        p->serving->slots = fm_calloc(1, sizeof *p->serving->slots);
    if (!p->serving || !p->serving->slots) {
        rc = fm_errf(err, FM_ENOMEM, "out of memory");
        goto fail;
    }
    p->serving->nslots = 1;
    p->serving->slots[0].model = p->model;
    snprintf(p->serving->slots[0].ref, sizeof p->serving->slots[0].ref, "%s", p->model_ref);
    p->scorer = (batch_scorer){.pick = scorer_pick,
                               .shadow_pick = scorer_shadow_pick,
                               .predict = scorer_predict,
                               .ok_doc = scorer_ok_doc,
                               .model_ref = scorer_model_ref,
                               .ud = p};
    p->env = (batch_env){.store = p->store,
                         .device_lookup = lookup_device,
                         .device_ud = p,
                         .scorer = &p->scorer,
                         .publish = p->opts.publish,
                         .publish_ud = p->opts.ud,
                         .max_payload = p->cfg.max_payload};
    atomic_store(&p->healthy, 1);
    pthread_mutex_init(&p->drift_mu, NULL);
    pthread_mutex_init(&p->in_mu, NULL);
    pthread_cond_init(&p->in_cv, NULL);
    if (fm_thread_start(&p->commit, "fm-commit", run, p) != 0) {
        rc = fm_errf(err, FM_ENOMEM, "cannot start pipeline thread");
        pthread_cond_destroy(&p->in_cv);
        pthread_mutex_destroy(&p->in_mu);
        goto fail;
    }
    int want = p->cfg.pipeline_workers > MAX_WORKERS ? MAX_WORKERS : p->cfg.pipeline_workers;
    for (int i = 0; i < want; i++) {
        if (pthread_create(&p->workers[i], NULL, worker, p) != 0)
            break; /* fewer workers is still a working pipeline */
        pthread_setname_np(p->workers[i], "fm-worker");
        p->nworkers++;
    }
    fm_logkv(FM_LOG_INFO, "pipeline", "started", "model", p->model_ref, NULL);
    *out = p;
    return 0;
fail:
    fm_serving_free(p->serving);
    fm_model_free(p->model);
    fm_store_close(p->store);
    fm_free(p->devices);
    fm_free(p);
    return rc;
}

static int submit_counted(fm_pipeline *p, fm_inmsg *m);

/* Largest payload an idle commit thread prepares itself (see
 * submit_counted); anything bigger, valid or not, is parsed by a worker so
 * the one serial thread never spends long on it. A sweep is 2-5 KB. */
#define DIRECT_MAX_BYTES 16384

/* Appends a message to the commit thread's queue. Called with its lock held. */
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
        fm_thread_wake(&p->commit);
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
        (void)batch__prepare(m, p->cfg.max_payload);
        fm_thread_lock(&p->commit);
        enqueue_ready(p, m);
        fm_thread_unlock(&p->commit);
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
        fm_thread_lock(&p->commit);
        int rc = fm_thread_should_stop(&p->commit) ? FM_ESTATE
                 : p->depth >= p->cfg.queue_max   ? FM_EBUSY
                                                  : 0;
        if (rc == 0)
            enqueue_ready(p, m);
        fm_thread_unlock(&p->commit);
        return rc;
    }
    pthread_mutex_lock(&p->in_mu);
    /* Both stages count against the limit; reading depth without its lock is
     * a benign race that can only be off by the messages in flight. */
    long total = p->in_depth + __atomic_load_n(&p->depth, __ATOMIC_RELAXED);
    int rc = p->in_stopping ? FM_ESTATE : total >= p->cfg.queue_max ? FM_EBUSY : 0;
    if (rc == 0 && p->in_depth == 0 && m->len <= DIRECT_MAX_BYTES) {
        /* Nothing is in the worker stage (in_depth counts a message until
         * it is handed on), so nothing submitted earlier can be overtaken.
         * If the commit thread is waiting too, it prepares this one itself:
         * one thread woken instead of two. Lock order: in_mu, then the
         * commit thread's; nothing takes them the other way round. */
        fm_thread_lock(&p->commit);
        bool direct = p->idle && !p->head && !fm_thread_should_stop(&p->commit);
        if (direct)
            enqueue_ready(p, m);
        fm_thread_unlock(&p->commit);
        if (direct) {
            pthread_mutex_unlock(&p->in_mu);
            return 0;
        }
    }
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
fm_model *fm_pipeline_base_model(fm_pipeline *p) { return p->model; }

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
    fm_thread_stop(&p->commit); /* it drains its queue first */
    fm_serving_free(p->serving);
    fm_serving_free(atomic_exchange(&p->next, NULL));
    fm_free(p->drift);
    pthread_mutex_destroy(&p->drift_mu);
    fm_model_free(p->model);
    fm_store_close(p->store);
    fm_free(p->devices);
    fm_free(p);
}
