/*
 * One group commit, phase by phase (see batch.h for the order and why the
 * environment is injected). Nothing here waits or takes a lock: the commit
 * thread owns the batch from init to release.
 */
#include "pipeline/batch.h"
#include "fleetml/metrics.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

/* Quarantine keeps evidence, not whole floods: at most the first
 * QUARANTINE_MAX bytes of a rejected payload are kept. */
#define QUARANTINE_MAX (16 * 1024)

static void reject(batch_item *it, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void reject(batch_item *it, const char *code, const char *fmt, ...)
{
    it->rejected = true;
    snprintf(it->verr.code, sizeof it->verr.code, "%s", code);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(it->verr.message, sizeof it->verr.message, fmt, ap);
    va_end(ap);
}

int batch__prepare(fm_inmsg *msg, int max_payload)
{
    if (msg->prep)
        return 0;
    uint64_t t0 = fm_mono_ns();
    fm_stage_observe(FM_STAGE_QUEUE, msg->recv_ns);
    prepared *pr = fm_calloc(1, sizeof *pr);
    if (!pr)
        return FM_ENOMEM;
    if ((int64_t)msg->len > max_payload) {
        pr->parse_rc = fm_verrf(&pr->verr, FM_VERR_TOO_LARGE,
                                "payload is %zu bytes, the limit is %d bytes", msg->len,
                                max_payload);
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

/* Frees the batch's own arrays (not the messages) and zeroes it. */
static void free_arrays(batch *b)
{
    fm_free(b->items);
    fm_free(b->feat);
    fm_free(b->pred);
    fm_free(b->spred);
    fm_free(b->gfeat);
    fm_free(b->gpred);
    fm_free(b->grow);
    fm_free(b->rowmsg);
    fm_free(b->gmsg);
    fm_free(b->recs);
    fm_free(b->quar);
    fm_free(b->index);
    memset(b, 0, sizeof *b);
}

int batch__init(batch *b, fm_inmsg *list, size_t n)
{
    memset(b, 0, sizeof *b);
    size_t nf = fm_feature_count();
    b->items = fm_calloc(n, sizeof *b->items);
    /* + 1: never a zero-sized allocation. */
    b->feat = fm_malloc((n * nf + 1) * sizeof(float));
    b->pred = fm_malloc((n * FM_OUTPUTS_MAX + 1) * sizeof(float));
    b->recs = fm_calloc(n, sizeof *b->recs);
    b->quar = fm_calloc(n, sizeof *b->quar);
    b->rowmsg = fm_calloc(n + 1, sizeof *b->rowmsg);
    /* The repeat index: a power of two at least twice n, so probes stay
     * short (at most half full). */
    size_t cap = 16;
    while (cap < 2 * n)
        cap *= 2;
    b->index = fm_calloc(cap, sizeof *b->index);
    b->index_mask = cap - 1;
    if (!b->items || !b->feat || !b->pred || !b->recs || !b->quar || !b->rowmsg || !b->index) {
        free_arrays(b);
        return FM_ENOMEM;
    }
    size_t i = 0;
    for (fm_inmsg *m = list; m && i < n; m = m->next) {
        b->items[i].shadow = FM_SERVING_NONE;
        b->items[i++].msg = m;
    }
    b->n = i;
    b->model_ok = true;
    b->committed = true;
    return 0;
}

/* Device check, the preparation's verdict, and repeats within the batch. */
static void admit_one(batch *b, size_t i, const batch_env *env)
{
    batch_item *it = &b->items[i];
    fm_inmsg *msg = it->msg;
    if (batch__prepare(msg, env->max_payload) != 0) {
        reject(it, FM_VERR_INTERNAL, "out of memory, retry later");
        return;
    }
    int rc = env->device_lookup(env->device_ud, msg->device_id, &it->dev);
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
        it->rejected = true;
        return;
    }
    /* The measurement now belongs to the batch item. */
    it->m = pr->m;
    memset(&pr->m, 0, sizeof pr->m);
    /* A repeat of an earlier row of this batch follows it. Only rows are in
     * the index: an earlier item rejected for its features leads nothing. */
    size_t slot = fm_fnv1a(fm_fnv1a(FM_FNV1A_INIT, msg->device_id) ^ 0x2f, it->m.id) &
                  b->index_mask;
    for (; b->index[slot]; slot = (slot + 1) & b->index_mask) {
        size_t j = b->index[slot] - 1;
        batch_item *o = &b->items[j];
        if (strcmp(o->m.id, it->m.id) == 0 && strcmp(o->msg->device_id, msg->device_id) == 0) {
            it->follower = true;
            it->leader = j;
            return;
        }
    }
    if (pr->feat_rc != 0) {
        it->verr = pr->verr;
        it->rejected = true;
        return;
    }
    size_t nf = fm_feature_count();
    memcpy(b->feat + b->rows * nf, pr->feat, nf * sizeof(float));
    it->slot = env->scorer->pick ? env->scorer->pick(env->scorer->ud, &it->dev) : 0;
    it->shadow = env->scorer->shadow_pick ? env->scorer->shadow_pick(env->scorer->ud, &it->dev)
                                          : FM_SERVING_NONE;
    b->rowmsg[b->rows] = it->msg->payload;
    it->row = b->rows++;
    b->index[slot] = i + 1;
}

void batch__admit(batch *b, const batch_env *env)
{
    fm_metrics *mx = fm_metrics_get();
    uint64_t t0 = fm_mono_ns();
    for (size_t i = 0; i < b->n; i++) {
        atomic_fetch_add(&mx->received, 1);
        if (b->items[i].msg->prep)
            fm_stage_observe(FM_STAGE_HANDOFF, b->items[i].msg->prepared_ns);
        admit_one(b, i, env);
    }
    fm_stage_observe(FM_STAGE_ADMIT, t0);
}

/* Scores rows grouped by a slot chosen per item (slot_of), one call per
 * slot: the features are gathered, scored, and the outputs put back into
 * out at each item's row. Items whose slot is skip are left alone. */
static int infer_grouped(batch *b, const batch_env *env, size_t (*slot_of)(const batch_item *),
                         size_t skip, float *out, fm_errbuf *err)
{
    const batch_scorer *sc = env->scorer;
    size_t nf = fm_feature_count();
    if (!b->gfeat) {
        b->gfeat = fm_malloc((b->rows * nf + 1) * sizeof(float));
        b->gpred = fm_malloc((b->rows * FM_OUTPUTS_MAX + 1) * sizeof(float));
        b->grow = fm_malloc((b->rows + 1) * sizeof(size_t));
        b->gmsg = fm_malloc((b->rows + 1) * sizeof *b->gmsg);
        if (!b->gfeat || !b->gpred || !b->grow || !b->gmsg)
            return fm_errf(err, FM_ENOMEM, "out of memory");
    }
    bool *done = fm_calloc(b->n + 1, sizeof *done);
    if (!done)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    int rc = 0;
    for (size_t i = 0; i < b->n && !rc; i++) {
        batch_item *lead = &b->items[i];
        if (done[i] || lead->rejected || lead->follower || slot_of(lead) == FM_SERVING_NONE)
            continue;
        size_t slot = slot_of(lead), k = 0;
        for (size_t j = i; j < b->n; j++) {
            batch_item *it = &b->items[j];
            if (done[j] || it->rejected || it->follower || slot_of(it) != slot)
                continue;
            done[j] = true;
            memcpy(b->gfeat + k * nf, b->feat + it->row * nf, nf * sizeof(float));
            b->gmsg[k] = b->rowmsg[it->row];
            b->grow[k++] = it->row;
        }
        if (slot == skip)
            continue; /* already scored with the whole matrix */
        rc = sc->predict(sc->ud, slot, b->gfeat, b->gmsg, k, b->gpred, err);
        for (size_t r = 0; r < k && !rc; r++)
            memcpy(out + b->grow[r] * FM_OUTPUTS_MAX, b->gpred + r * FM_OUTPUTS_MAX,
                   FM_OUTPUTS_MAX * sizeof(float));
    }
    fm_free(done);
    return rc;
}

static size_t live_slot(const batch_item *it) { return it->slot; }
static size_t shadow_slot(const batch_item *it) { return it->shadow; }

/* Shadow versions score their tenants' rows too; a failure there costs
 * the shadow answers of this batch, never a live reply. */
static void infer_shadow(batch *b, const batch_env *env)
{
    bool any = false;
    for (size_t i = 0; i < b->n && !any; i++)
        any = !b->items[i].rejected && !b->items[i].follower &&
              b->items[i].shadow != FM_SERVING_NONE;
    if (!any)
        return;
    fm_errbuf err;
    b->spred = fm_malloc((b->rows * FM_OUTPUTS_MAX + 1) * sizeof(float));
    int rc = b->spred ? infer_grouped(b, env, shadow_slot, FM_SERVING_NONE, b->spred, &err)
                      : fm_errf(&err, FM_ENOMEM, "out of memory");
    if (rc) {
        fm_logf(FM_LOG_WARN, "pipeline", "shadow inference failed: %s", err.msg);
        atomic_fetch_add(&fm_metrics_get()->shadow_failures, 1);
        fm_free(b->spred);
        b->spred = NULL;
    }
}

void batch__infer(batch *b, const batch_env *env)
{
    if (b->rows == 0)
        return;
    const batch_scorer *sc = env->scorer;
    fm_errbuf err;
    uint64_t t0 = fm_mono_ns();
    /* The common case, one model for the whole batch, is one call over the
     * matrix as it is; other slots' rows are then re-scored by their own
     * model (a few rows a batch, while a canary runs). */
    size_t first = SIZE_MAX;
    bool mixed = false;
    for (size_t i = 0; i < b->n; i++) {
        batch_item *it = &b->items[i];
        if (it->rejected || it->follower)
            continue;
        if (first == SIZE_MAX)
            first = it->slot;
        else if (it->slot != first)
            mixed = true;
    }
    int rc = sc->predict(sc->ud, first, b->feat, b->rowmsg, b->rows, b->pred, &err);
    if (!rc && mixed)
        rc = infer_grouped(b, env, live_slot, first, b->pred, &err);
    if (rc != 0) {
        fm_logf(FM_LOG_ERROR, "pipeline", "inference failed: %s", err.msg);
        b->model_ok = false;
    }
    if (rc == 0)
        infer_shadow(b, env);
    fm_hist_observe(&fm_metrics_get()->inference_seconds, (double)(fm_mono_ns() - t0) / 1e9);
}

/* Our fault, not the payload's: nothing to quarantine. */
static bool server_fault(const fm_verr *e)
{
    return strcmp(e->code, FM_VERR_UNAVAILABLE) == 0 || strcmp(e->code, FM_VERR_INTERNAL) == 0;
}

void batch__build_rows(batch *b, const batch_env *env)
{
    const batch_scorer *sc = env->scorer;
    for (size_t i = 0; i < b->n; i++) {
        batch_item *it = &b->items[i];
        if (it->follower)
            continue;
        if (!it->rejected && !b->model_ok)
            reject(it, FM_VERR_INTERNAL, "model inference failed, retry later");
        if (it->rejected) {
            if (server_fault(&it->verr))
                continue;
            fm_inmsg *msg = it->msg;
            if (msg->len > QUARANTINE_MAX) {
                size_t ml = strlen(it->verr.message);
                snprintf(it->verr.message + ml, sizeof it->verr.message - ml,
                         " [quarantined: first %d of %zu bytes]", QUARANTINE_MAX, msg->len);
            }
            b->quar[b->nq++] = (fm_quarantine){
                .device_id = msg->device_id,
                .tenant = it->dev.tenant,
                .received_ms = msg->recv_ms,
                .payload = msg->payload,
                .payload_len = msg->len > QUARANTINE_MAX ? QUARANTINE_MAX : msg->len,
                .error_code = it->verr.code,
                .error_message = it->verr.message,
            };
            continue;
        }
        const float *out = b->pred + it->row * FM_OUTPUTS_MAX;
        if (isnan(out[0])) {
            /* This row's processor failed (a function that did not
             * answer): only its device retries; nothing of it is stored. */
            reject(it, FM_VERR_INTERNAL, "the processor did not answer, retry later");
            continue;
        }
        it->result = sc->ok_doc(sc->ud, it->slot, it->m.id, out, it->msg->recv_ms);
        if (!it->result) {
            reject(it, FM_VERR_INTERNAL, "out of memory, retry later");
            continue;
        }
        if (b->spred && it->shadow != FM_SERVING_NONE)
            it->shadow_result = sc->ok_doc(sc->ud, it->shadow, it->m.id,
                                           b->spred + it->row * FM_OUTPUTS_MAX,
                                           it->msg->recv_ms);
        it->rec = b->nr;
        it->has_rec = true;
        b->recs[b->nr++] = (fm_record){
            .device_id = it->msg->device_id,
            .tenant = it->dev.tenant,
            .measurement_id = it->m.id,
            .received_ms = it->msg->recv_ms,
            .taken_ms = it->m.taken_at_ms,
            .payload = it->msg->payload,
            .payload_len = it->msg->len,
            .result_json = it->result,
            .model = sc->model_ref(sc->ud, it->slot),
            .shadow_json = it->shadow_result,
        };
    }
}

bool batch__commit(batch *b, const batch_env *env)
{
    if (b->nr + b->nq == 0)
        return b->committed = true;
    fm_metrics *mx = fm_metrics_get();
    fm_errbuf err;
    uint64_t t0 = fm_mono_ns();
    int rc = fm_store_commit(env->store, b->recs, b->nr, b->quar, b->nq, &err);
    fm_hist_observe(&mx->commit_seconds, (double)(fm_mono_ns() - t0) / 1e9);
    if (rc != 0) {
        b->commit_err = err;
        return b->committed = false;
    }
    for (size_t i = 0; i < b->n; i++) {
        batch_item *it = &b->items[i];
        if (it->has_rec && b->recs[it->rec].existed)
            it->existed = true;
        else if (it->has_rec)
            b->stored++;
    }
    fm_hist_observe(&mx->commit_batch_size, (double)b->nr);
    atomic_fetch_add(&mx->stored, b->stored);
    return b->committed = true;
}

static void publish_reply(const batch_env *env, fm_inmsg *msg, const char *doc)
{
    char topic[256];
    int rc = 0;
    if (msg->reply) {
        msg->reply(msg->reply_ud, doc, strlen(doc));
        msg->reply = NULL;
    } else {
        fm_reply_topic(msg->device_id, msg->response_topic, "results", topic, sizeof topic);
        rc = env->publish(env->publish_ud, topic, doc, strlen(doc), msg->corr, msg->corr_len);
    }
    fm_metrics *mx = fm_metrics_get();
    if (rc == 0)
        atomic_fetch_add(&mx->replied, 1);
    fm_hist_observe(&mx->reply_seconds, (double)(fm_mono_ns() - msg->recv_ns) / 1e9);
}

/* The stored result of an item whose key existed (read only now, on
 * conflict); the item is rejected "unavailable" when it cannot be read. */
static void load_stored(batch_item *it, const batch_env *env)
{
    char *stored = NULL;
    if (fm_store_result_lookup(env->store, it->msg->device_id, it->m.id, &stored) == 0) {
        fm_free(it->result);
        it->result = stored;
        return;
    }
    reject(it, FM_VERR_UNAVAILABLE, "store unavailable, retry later");
}

void batch__reply(batch *b, const batch_env *env)
{
    fm_metrics *mx = fm_metrics_get();
    uint64_t t0 = fm_mono_ns();
    for (size_t i = 0; i < b->n; i++) {
        batch_item *it = &b->items[i];
        if (it->existed)
            load_stored(it, env);
    }
    for (size_t i = 0; i < b->n; i++) {
        batch_item *it = &b->items[i];
        const char *doc = NULL;
        char *owned = NULL;
        if (it->follower) {
            batch_item *lead = &b->items[it->leader];
            if (b->committed && !lead->rejected) {
                doc = lead->result;
                atomic_fetch_add(&mx->duplicates, 1);
            } else {
                it->verr = lead->verr;
                if (!b->committed)
                    snprintf(it->verr.code, sizeof it->verr.code, "%s", FM_VERR_UNAVAILABLE);
                it->rejected = true;
            }
        } else if (!it->rejected && !b->committed) {
            reject(it, FM_VERR_UNAVAILABLE, "measurement could not be stored, retry later");
        } else if (!it->rejected) {
            doc = it->result;
            if (it->existed)
                atomic_fetch_add(&mx->duplicates, 1);
        }
        if (it->rejected) {
            char mid[FM_MEAS_ID_MAX + 1];
            if (it->m.id[0])
                snprintf(mid, sizeof mid, "%s", it->m.id);
            else
                fm_measurement_peek_id(it->msg->payload, it->msg->len, mid);
            atomic_fetch_add(&mx->rejected[fm_reject_reason_from_code(it->verr.code)], 1);
            owned = fm_error_result_json(mid, it->verr.code, it->verr.message);
            doc = owned;
        }
        if (doc)
            publish_reply(env, it->msg, doc);
        fm_free(owned);
    }
    fm_stage_observe(FM_STAGE_PUBLISH, t0);
}

long batch__release(batch *b)
{
    long released = 0;
    for (size_t i = 0; i < b->n; i++) {
        fm_inmsg *msg = b->items[i].msg;
        released += (long)msg->len;
        fm_measurement_free(&b->items[i].m);
        fm_free(b->items[i].result);
        fm_free(b->items[i].shadow_result);
        if (msg->reply) /* never answered: tell the waiter */
            msg->reply(msg->reply_ud, NULL, 0);
        fm_inmsg_free(msg);
    }
    free_arrays(b);
    return released;
}
