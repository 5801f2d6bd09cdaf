/*
 * The deployer (fleetml/modelreg.h): turns the catalogue's aliases into
 * serving tables for the pipeline, off the reply path.
 *
 * Every tick (or when woken) it reads deploy_seq; when the log moved, it
 * reads every tenant's aliases of the served family, loads the versions it
 * does not hold yet (from the catalogue, validated as at upload), and hands
 * the pipeline a new immutable table. The pipeline switches tables between
 * batches, so a batch in flight finishes on the versions it started with.
 *
 * Loaded models live in a cache owned by this thread. A model is freed only
 * when no table the pipeline may still use references it: each cached model
 * remembers the newest table generation naming it, and the pipeline reports
 * the generation it scores with (tables only move forward).
 */
#include "fleetml/modelreg.h"
#include "fleetml/thread.h"
#include "fleetml/metrics.h"

#include <stdio.h>
#include <string.h>

#define TICK_NS (500ll * 1000000ll)
#define DRIFT_FLUSH_NS (10ull * 1000000000ull)

typedef struct cached {
    fm_model *model;
    char ref[128];    /* name@version */
    uint64_t last_gen; /* newest table generation that names it */
    uint64_t idle_since_ns; /* when no table in use named it any more (0: in use) */
} cached;

/* A version no table names any more stays loaded this long (a rollback,
 * or the next move back, then costs no load), within CACHE_IDLE_MAX. */
#define CACHE_IDLE_NS (120ull * 1000000000ull)
#define CACHE_IDLE_MAX 4

struct fm_deployer {
    fm_thread thread;
    fm_config cfg;
    char family[65];
    fm_model *base;
    char base_ref[128];
    fm_serving_sink sink;
    fm_store *store;
    cached *cache;
    size_t ncache, cache_cap;
    int64_t seen_seq; /* -1: nothing published yet */
    uint64_t generation;
    bool wake;
    uint64_t next_drift_ns;
    /* (tenant, version, day) already alerted, so an alert is raised once */
    char (*alerted)[200];
    size_t nalerted;
    /* Alerts judged but not yet claimed (the claim is a write, made after
     * the read that judged them; one a busy store refused waits here for
     * the next tick, new counts or not). */
    struct drift_alert *pending;
    size_t npending;
};

typedef struct drift_alert {
    char key[200]; /* tenant|model|day */
    char tenant[65];
    char model[128];
    double psi;
    size_t worst;
    uint64_t n;
} drift_alert;

/* ---- the table --------------------------------------------------------------- */

int fm_serving_bucket(const char *device_id)
{
    /* FNV-1a: stable across nodes, builds and restarts. */
    uint32_t h = 2166136261u;
    for (const char *p = device_id; p && *p; p++)
        h = (h ^ (unsigned char)*p) * 16777619u;
    return (int)(h % 100u);
}

size_t fm_serving_pick(const fm_serving *s, const char *tenant, const char *device_id)
{
    if (!s)
        return 0;
    for (size_t i = 0; i < s->ntenants; i++) {
        const fm_serving_tenant *t = &s->tenants[i];
        if (strcmp(t->tenant, tenant) != 0)
            continue;
        if (t->canary_pct > 0 && fm_serving_bucket(device_id) < t->canary_pct)
            return t->canary;
        return t->production;
    }
    return 0;
}

size_t fm_serving_shadow(const fm_serving *s, const char *tenant)
{
    for (size_t i = 0; s && i < s->ntenants; i++)
        if (strcmp(s->tenants[i].tenant, tenant) == 0)
            return s->tenants[i].shadow;
    return FM_SERVING_NONE;
}

void fm_serving_free(fm_serving *s)
{
    if (!s)
        return;
    fm_free(s->slots);
    fm_free(s->tenants);
    fm_free(s);
}

/* ---- the cache ----------------------------------------------------------------- */

/* The cached model for name@version, loading it when needed. NULL (err
 * set) when it cannot be loaded. */
static cached *cache_get(fm_deployer *d, const char *name, const char *version, fm_errbuf *err)
{
    char ref[128];
    snprintf(ref, sizeof ref, "%s@%s", name, version);
    for (size_t i = 0; i < d->ncache; i++)
        if (d->cache[i].model && strcmp(d->cache[i].ref, ref) == 0)
            return &d->cache[i];
    fm_model_rec v;
    void *file = NULL;
    size_t len = 0;
    int rc = d->store->models->version_get(d->store, name, version, &v);
    if (!rc)
        rc = d->store->models->version_file(d->store, name, version, &file, &len);
    fm_model *m = NULL;
    if (rc)
        fm_errf(err, rc, "%s: cannot read it from the catalogue", ref);
    else
        rc = fm_model_load_mem(v.manifest_json, strlen(v.manifest_json), file, len, &m, err);
    fm_model_rec_clear(&v);
    fm_free(file);
    if (rc)
        return NULL;
    cached *slot = NULL;
    for (size_t i = 0; i < d->ncache && !slot; i++)
        if (!d->cache[i].model)
            slot = &d->cache[i];
    if (!slot) {
        if (d->ncache == d->cache_cap) {
            size_t cap = d->cache_cap ? d->cache_cap * 2 : 8;
            cached *nc = fm_realloc(d->cache, cap * sizeof *nc);
            if (!nc) {
                fm_model_free(m);
                fm_errf(err, FM_ENOMEM, "out of memory");
                return NULL;
            }
            d->cache = nc;
            d->cache_cap = cap;
        }
        slot = &d->cache[d->ncache++];
    }
    memset(slot, 0, sizeof *slot);
    slot->model = m;
    snprintf(slot->ref, sizeof slot->ref, "%s", ref);
    fm_logkv(FM_LOG_INFO, "model", "version loaded for serving", "model", ref, NULL);
    return slot;
}

/* Frees cached models no table in use can name any more, once they have
 * been idle CACHE_IDLE_NS, or at once beyond CACHE_IDLE_MAX idle ones
 * (oldest first). */
static void cache_evict(fm_deployer *d)
{
    uint64_t in_use = d->sink.in_use(d->sink.ud), now = fm_mono_ns();
    size_t idle = 0;
    for (size_t i = 0; i < d->ncache; i++) {
        cached *c = &d->cache[i];
        bool unused = c->model && c->last_gen < in_use && c->last_gen < d->generation;
        if (!unused) {
            c->idle_since_ns = 0;
            continue;
        }
        if (!c->idle_since_ns)
            c->idle_since_ns = now;
        idle++;
    }
    for (;;) {
        cached *victim = NULL;
        for (size_t i = 0; i < d->ncache; i++) {
            cached *c = &d->cache[i];
            if (!c->model || !c->idle_since_ns)
                continue;
            bool expired = now - c->idle_since_ns > CACHE_IDLE_NS;
            if ((expired || idle > CACHE_IDLE_MAX) &&
                (!victim || c->idle_since_ns < victim->idle_since_ns))
                victim = c;
        }
        if (!victim)
            break;
        fm_logkv(FM_LOG_INFO, "model", "version unloaded", "model", victim->ref, NULL);
        fm_model_free(victim->model);
        victim->model = NULL;
        victim->idle_since_ns = 0;
        idle--;
    }
}

/* ---- building a table ------------------------------------------------------------ */

typedef struct build {
    fm_deployer *d;
    fm_serving *s;
    size_t slot_cap, tenant_cap;
    int rc;
    fm_errbuf err;
} build;

static size_t add_slot(build *b, cached *c)
{
    for (size_t i = 1; i < b->s->nslots; i++)
        if (b->s->slots[i].model == c->model)
            return i;
    if (b->s->nslots == b->slot_cap) {
        size_t cap = b->slot_cap * 2;
        fm_serving_slot *ns = fm_realloc(b->s->slots, cap * sizeof *ns);
        if (!ns) {
            b->rc = FM_ENOMEM;
            return 0;
        }
        b->s->slots = ns;
        b->slot_cap = cap;
    }
    fm_serving_slot *sl = &b->s->slots[b->s->nslots];
    sl->model = c->model;
    snprintf(sl->ref, sizeof sl->ref, "%s", c->ref);
    c->last_gen = b->s->generation;
    return b->s->nslots++;
}

static fm_serving_tenant *tenant_entry(build *b, const char *tenant)
{
    for (size_t i = 0; i < b->s->ntenants; i++)
        if (strcmp(b->s->tenants[i].tenant, tenant) == 0)
            return &b->s->tenants[i];
    if (b->s->ntenants == b->tenant_cap) {
        size_t cap = b->tenant_cap ? b->tenant_cap * 2 : 8;
        fm_serving_tenant *nt = fm_realloc(b->s->tenants, cap * sizeof *nt);
        if (!nt) {
            b->rc = FM_ENOMEM;
            return NULL;
        }
        b->s->tenants = nt;
        b->tenant_cap = cap;
    }
    fm_serving_tenant *t = &b->s->tenants[b->s->ntenants++];
    memset(t, 0, sizeof *t);
    t->shadow = FM_SERVING_NONE;
    snprintf(t->tenant, sizeof t->tenant, "%s", tenant);
    return t;
}

static int on_alias(void *ud, const fm_model_alias *a)
{
    build *b = ud;
    if (strcmp(a->name, b->d->family) != 0 || b->rc)
        return b->rc;
    fm_errbuf err;
    cached *c = cache_get(b->d, a->name, a->version, &err);
    if (!c) {
        /* One unusable version must not take the others down: the tenant
         * keeps what it had (the bundled model when nothing else). */
        fm_logkv(FM_LOG_ERROR, "model", "cannot serve a deployed version", "tenant", a->tenant,
                 "alias", a->alias, "error", err.msg, NULL);
        return 0;
    }
    size_t slot = add_slot(b, c);
    fm_serving_tenant *t = b->rc ? NULL : tenant_entry(b, a->tenant);
    if (!t)
        return b->rc;
    if (strcmp(a->alias, FM_ALIAS_PRODUCTION) == 0) {
        t->production = slot;
    } else if (strcmp(a->alias, FM_ALIAS_CANARY) == 0) {
        t->canary = slot;
        t->canary_pct = a->share_pct < 0 ? 0 : a->share_pct > 100 ? 100 : a->share_pct;
    } else if (strcmp(a->alias, FM_ALIAS_SHADOW) == 0) {
        t->shadow = slot;
    }
    return 0;
}

static int rebuild(fm_deployer *d, fm_errbuf *err)
{
    build b = {.d = d, .slot_cap = 4};
    b.s = fm_calloc(1, sizeof *b.s);
    if (b.s)
        b.s->slots = fm_calloc(b.slot_cap, sizeof *b.s->slots);
    if (!b.s || !b.s->slots) {
        fm_serving_free(b.s);
        return fm_errf(err, FM_ENOMEM, "out of memory");
    }
    b.s->generation = d->generation + 1;
    b.s->slots[0].model = d->base;
    snprintf(b.s->slots[0].ref, sizeof b.s->slots[0].ref, "%s", d->base_ref);
    b.s->nslots = 1;
    int rc = d->store->models->alias_list(d->store, NULL, on_alias, &b);
    if (!rc)
        rc = b.rc;
    if (rc) {
        fm_serving_free(b.s);
        return fm_errf(err, rc, "cannot read the deployment aliases");
    }
    /* A canary without a production version stands beside the bundled
     * model (slot 0, already the default). */
    d->generation = b.s->generation;
    d->sink.publish(d->sink.ud, b.s);
    return 0;
}

/* The model version behind ref, if this node has it loaded. */
static fm_model *loaded(fm_deployer *d, const char *ref)
{
    if (strcmp(ref, d->base_ref) == 0)
        return d->base;
    for (size_t i = 0; i < d->ncache; i++)
        if (d->cache[i].model && strcmp(d->cache[i].ref, ref) == 0)
            return d->cache[i].model;
    return NULL;
}

typedef struct drift_check {
    fm_deployer *d;
    double max;
} drift_check;

static bool already_judged(const fm_deployer *d, const char *key)
{
    for (size_t i = 0; i < d->nalerted; i++)
        if (strcmp(d->alerted[i], key) == 0)
            return true;
    for (size_t i = 0; i < d->npending; i++)
        if (strcmp(d->pending[i].key, key) == 0)
            return true;
    return false;
}

/* Judges one tenant's counts for one model version. Called while the
 * store reads them, so it only notes an alert to raise: claiming it is a
 * write, which inside the read's snapshot would fail as soon as another
 * connection has committed since (SQLite's BUSY_SNAPSHOT), and such a
 * failure must not pass for "another node has claimed it". */
static int check_one(void *ud, const fm_drift_counts *c)
{
    drift_check *k = ud;
    fm_deployer *d = k->d;
    fm_model *m = loaded(d, c->model);
    if (!m || !fm_model_has_baseline(m) || c->n < (uint64_t)d->cfg.drift_min_count)
        return 0;
    double psi[FM_FEATURES_MAX];
    size_t worst;
    double max = fm_drift_psi_all(m, c, psi, &worst);
    if (max > k->max)
        k->max = max;
    fm_metrics_drift_set(c->tenant, c->model, max);
    if (max * 100.0 < d->cfg.drift_psi_pct)
        return 0;
    char key[200];
    snprintf(key, sizeof key, "%s|%s|%lld", c->tenant, c->model, (long long)c->day);
    if (already_judged(d, key))
        return 0;
    drift_alert *np = fm_realloc(d->pending, (d->npending + 1) * sizeof *np);
    if (!np)
        return 0; /* judged again at the next tick */
    d->pending = np;
    drift_alert *a = &d->pending[d->npending++];
    snprintf(a->key, sizeof a->key, "%s", key);
    snprintf(a->tenant, sizeof a->tenant, "%s", c->tenant);
    snprintf(a->model, sizeof a->model, "%s", c->model);
    a->psi = max;
    a->worst = worst;
    a->n = c->n;
    return 0;
}

static void remember_alerted(fm_deployer *d, const char *key)
{
    char (*na)[200] = fm_realloc(d->alerted, (d->nalerted + 1) * sizeof *na);
    if (na) {
        d->alerted = na;
        snprintf(d->alerted[d->nalerted++], sizeof d->alerted[0], "%s", key);
    }
}

/* Claims and raises one judged alert. Every node sharing the database
 * sees the same counts: the first to claim the alert (a lease that
 * outlives the day) raises it, once for the cluster (a restart of the same
 * node included), and its audit entry (the drift.alert event) commits in
 * the claim's own transaction. Returns false when the store could not be
 * written (the alert stays pending); a claim another node holds counts as
 * done. */
static bool raise_alert(fm_deployer *d, const drift_alert *p)
{
    char claim[240];
    snprintf(claim, sizeof claim, "drift-alert:%s", p->key);
    char psis[32], ns[32];
    snprintf(psis, sizeof psis, "%.3f", p->psi);
    snprintf(ns, sizeof ns, "%llu", (unsigned long long)p->n);
    char details[256];
    snprintf(details, sizeof details,
             "{\"psi\":%.4f,\"feature\":\"%s\",\"measurements\":%llu,\"threshold\":%.2f}", p->psi,
             fm_feature_name(p->worst), (unsigned long long)p->n, d->cfg.drift_psi_pct / 100.0);
    fm_audit a = {.at_ms = fm_wall_ms(), .tenant = p->tenant, .actor = "fleetml",
                  .action = "drift.alert", .target = p->model, .outcome = "ok", .client = "",
                  .details_json = details};
    fm_errbuf err;
    int lrc = fm_store_claim_audit(d->store, claim, d->cfg.node_id, 2 * 86400000LL, &a, &err);
    if (lrc != 0 && lrc != FM_EBUSY) {
        fm_logkv(FM_LOG_WARN, "model", "drift alert not recorded yet; will try again", "error",
                 err.msg, NULL);
        return false;
    }
    remember_alerted(d, p->key);
    if (lrc == FM_EBUSY)
        return true; /* another node raised it */
    fm_logkv(FM_LOG_WARN, "model", "drift alert", "tenant", p->tenant, "model", p->model,
             "feature", fm_feature_name(p->worst), "psi", psis, "measurements", ns, NULL);
    atomic_fetch_add(&fm_metrics_get()->drift_alerts, 1);
    return true;
}

/* Raises the pending alerts; those the store refused stay for later. */
static void raise_pending(fm_deployer *d)
{
    size_t kept = 0;
    for (size_t i = 0; i < d->npending; i++)
        if (!raise_alert(d, &d->pending[i]))
            d->pending[kept++] = d->pending[i];
    d->npending = kept;
}

/* Adds the pipeline's counts to the store, then judges today's drift of
 * every tenant that measured. */
static void drift_tick(fm_deployer *d)
{
    if (!d->sink.take_drift)
        return;
    fm_drift_counts *c = NULL;
    size_t n = d->sink.take_drift(d->sink.ud, &c);
    fm_errbuf err;
    for (size_t i = 0; i < n; i++)
        if (d->store->models->drift_add(d->store, &c[i], &err) != 0)
            fm_logkv(FM_LOG_WARN, "model", "drift counts not stored", "error", err.msg, NULL);
    drift_check k = {.d = d};
    int64_t today = fm_wall_ms() / 86400000;
    for (size_t i = 0; i < n; i++) {
        bool seen = false;
        for (size_t j = 0; j < i && !seen; j++)
            seen = strcmp(c[j].tenant, c[i].tenant) == 0;
        if (!seen && c[i].day == today)
            d->store->models->drift_get(d->store, c[i].tenant, today, check_one, &k);
    }
    if (n)
        atomic_store(&fm_metrics_get()->drift_psi_max_micro, (uint64_t)(k.max * 1e6));
    fm_free(c);
    raise_pending(d);
}

static void *deployer_main(void *arg)
{
    fm_deployer *d = arg;
    fm_thread_lock(&d->thread);
    while (!fm_thread_should_stop(&d->thread)) {
        d->wake = false;
        fm_thread_unlock(&d->thread);
        int64_t seq = 0;
        fm_errbuf err;
        if (d->store->models->deploy_seq(d->store, &seq) == 0 && seq != d->seen_seq) {
            if (rebuild(d, &err) == 0) {
                d->seen_seq = seq;
                fm_logf(FM_LOG_INFO, "model", "serving table %llu published",
                        (unsigned long long)d->generation);
            } else {
                fm_logkv(FM_LOG_WARN, "model", "deployment not applied, retrying", "error",
                         err.msg, NULL);
            }
        }
        cache_evict(d);
        uint64_t now = fm_mono_ns();
        if (now >= d->next_drift_ns) {
            drift_tick(d);
            d->next_drift_ns = now + DRIFT_FLUSH_NS;
        }
        fm_thread_lock(&d->thread);
        if (!d->wake && !fm_thread_should_stop(&d->thread))
            fm_thread_wait_ns(&d->thread, TICK_NS);
    }
    fm_thread_unlock(&d->thread);
    return NULL;
}

int fm_deployer_start(const fm_config *cfg, const char *family, fm_model *base,
                      const char *base_ref, const fm_serving_sink *sink, fm_deployer **out,
                      fm_errbuf *err)
{
    fm_deployer *d = fm_calloc(1, sizeof *d);
    if (!d)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    d->cfg = *cfg;
    snprintf(d->family, sizeof d->family, "%s", family);
    d->base = base;
    snprintf(d->base_ref, sizeof d->base_ref, "%s", base_ref);
    d->sink = *sink;
    d->seen_seq = -1;
    int rc = fm_store_open(cfg, &d->store, err);
    if (!rc && fm_thread_start(&d->thread, "fm-deploy", deployer_main, d) != 0)
        rc = fm_errf(err, FM_ENOMEM, "cannot start the deployer thread");
    if (rc) {
        fm_store_close(d->store);
        fm_free(d);
        return rc;
    }
    *out = d;
    return 0;
}

void fm_deployer_wake(fm_deployer *d)
{
    if (!d)
        return;
    fm_thread_lock(&d->thread);
    d->wake = true;
    fm_thread_wake(&d->thread);
    fm_thread_unlock(&d->thread);
}

void fm_deployer_halt(fm_deployer *d)
{
    if (!d || !d->thread.running)
        return;
    fm_thread_stop(&d->thread);
    drift_tick(d); /* what the pipeline counted since the last tick */
}

void fm_deployer_stop(fm_deployer *d)
{
    if (!d)
        return;
    fm_deployer_halt(d);
    fm_free(d->alerted);
    fm_free(d->pending);
    for (size_t i = 0; i < d->ncache; i++)
        fm_model_free(d->cache[i].model);
    fm_free(d->cache);
    fm_store_close(d->store);
    fm_free(d);
}
