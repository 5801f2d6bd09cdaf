/*
 * The rules engine (fleetml/rules.h): reads events from committed data and
 * delivers them to each rule's targets, at least once, in order per rule.
 *
 * One thread, on one node of a cluster at a time (lease "rules", renewed
 * every RULES_LEASE_RENEW_MS, taken over RULES_LEASE_MS after its holder
 * stops renewing). Each tick it reloads the rules (a changed document is
 * recompiled; a deleted rule is dropped) and, for every enabled rule, reads
 * its event source after the rule's position (fm_store_scan_records, the
 * label log, presence changes, the registry event log), builds the events
 * of the rule's type and tenant (fleetml/events.h), runs the jq filter and
 * transform and delivers the outputs to every target.
 *
 * Why a position per rule rather than one per source: a failing webhook
 * holds back only its own rule. An event is "handled" once every target
 * took it or, after the rule's last retry (backoff retry_base_ms doubled per
 * attempt), once it is in the lake's dead-letter area; the position moves
 * only past handled events and is stored after each batch, so a crash or a
 * lease moving to another node redelivers at most one batch (at least
 * once: consumers drop repeats by event id). A target that already took an
 * event is not called again on that event's retries.
 */
#include "functions/rules_int.h"
#include "fleetml/events.h"
#include "fleetml/json.h"
#include "fleetml/metrics.h"
#include "fleetml/thread.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#define RULES_LEASE_MS 15000
#define RULES_LEASE_RENEW_MS 5000
#define RULES_BATCH 32
#define RULES_MAX 256

typedef struct rule_state {
    char tenant[72], name[72];
    char *spec_text;      /* as stored: a change means recompile */
    json_t *spec;
    fm_rule_prog *prog;
    int type;
    enum fm_event_source src;
    bool enabled;
    int retries;
    int64_t position;        /* handled up to here */
    int64_t stored_position; /* what the store has */
    /* The event being delivered, kept across its retries. */
    json_t *ev;
    json_t *outputs;
    int64_t ev_pos;
    unsigned done; /* targets that took it */
    int attempt;
    int64_t retry_at_ms;
    char last_error[640];
    int64_t updated_ms; /* the stored row's: a change means re-read (edit, replay) */
    bool present; /* seen by the last reload */
    _Atomic uint64_t events, delivered, failed, dead, filtered_out;
} rule_state;

struct fm_rules {
    fm_rules_opts opts;
    fm_config cfg;
    fm_thread thread;
    rules_ctx ctx;
    pthread_mutex_t mu; /* guards rules/n against the metrics render */
    rule_state *rules[RULES_MAX];
    size_t n;
    bool leader;
    int64_t lease_at_ms;
};

/* ---- positions ----------------------------------------------------------------- */

int fm_rules_source_position(fm_store *st, int type, int64_t *pos)
{
    switch (fm_event_type_source(type)) {
    case FM_SRC_RECORDS: return fm_store_max_seq(st, FM_STREAM_RAW, pos);
    case FM_SRC_LABELS: return fm_store_max_seq(st, FM_STREAM_LABELS, pos);
    case FM_SRC_PRESENCE: return fm_store_presence_rev(st, pos);
    case FM_SRC_REGISTRY: return fm_store_events_max(st, pos);
    case FM_SRC_ALIASES: return st->models->deploy_seq(st, pos);
    case FM_SRC_AUDIT: return fm_store_max_seq(st, FM_STREAM_AUDIT, pos);
    case FM_SRC_LAKE: return fm_store_lake_objects_max(st, pos);
    }
    return FM_EINVAL;
}

/* ---- reading a batch of events ------------------------------------------------- */

typedef struct batch {
    rule_state *rs;
    json_t *events[RULES_BATCH];
    int64_t pos[RULES_BATCH];
    size_t n;
    int64_t last; /* the last position read, matching or not */
    size_t rows;  /* rows read */
    char devices[RULES_BATCH][72]; /* registry source: subjects to look at */
    int64_t dev_pos[RULES_BATCH];
    int dev_kind[RULES_BATCH];
    size_t ndev;
} batch;

static void batch_add(batch *b, json_t *ev, int64_t pos)
{
    if (ev)
        b->events[b->n] = ev, b->pos[b->n++] = pos;
}

static bool mine(const batch *b, const char *tenant)
{
    return tenant && strcmp(tenant, b->rs->tenant) == 0;
}

static int on_record(void *ud, const fm_record *r)
{
    batch *b = ud;
    b->last = r->seq;
    b->rows++;
    if (mine(b, r->tenant))
        batch_add(b, fm_event_from_record(b->rs->type, r), r->seq);
    return 0;
}

static int on_label(void *ud, const fm_label *l)
{
    batch *b = ud;
    b->last = l->seq;
    b->rows++;
    if (mine(b, l->tenant))
        batch_add(b, fm_event_from_label(l), l->seq);
    return 0;
}

static int on_presence(void *ud, const fm_presence_change *c)
{
    batch *b = ud;
    b->last = c->rev;
    b->rows++;
    int type = c->online ? FM_EV_DEVICE_ONLINE : FM_EV_DEVICE_OFFLINE;
    if (mine(b, c->tenant) && type == b->rs->type)
        batch_add(b, fm_event_from_presence(c), c->rev);
    return 0;
}

static int on_registry(void *ud, int64_t seq, int kind, const char *subject)
{
    batch *b = ud;
    b->last = seq;
    b->rows++;
    int want = b->rs->type == FM_EV_DEVICE_PROVISIONED ? FM_EVENT_PROVISIONED : FM_EVENT_DEVICE;
    if (kind == want && b->ndev < RULES_BATCH) {
        snprintf(b->devices[b->ndev], sizeof b->devices[0], "%s", subject);
        b->dev_kind[b->ndev] = kind;
        b->dev_pos[b->ndev++] = seq;
    }
    return 0;
}

static int on_audit(void *ud, const fm_audit *a)
{
    batch *b = ud;
    b->last = a->seq;
    b->rows++;
    if (mine(b, a->tenant) && fm_event_type_parse(a->action) == b->rs->type)
        batch_add(b, fm_event_from_audit(a), a->seq);
    return 0;
}

static int on_alias(void *ud, int64_t seq, const fm_model_alias *a)
{
    batch *b = ud;
    b->last = seq;
    b->rows++;
    if (mine(b, a->tenant))
        batch_add(b, fm_event_from_alias(a, seq), seq);
    return 0;
}

static int on_lake_object(void *ud, const fm_lake_object *o)
{
    batch *b = ud;
    b->last = o->seq;
    b->rows++;
    if (mine(b, o->tenant))
        batch_add(b, fm_event_from_lake_object(o), o->seq);
    return 0;
}

/* Reads up to RULES_BATCH rows after rs->position from the rule's source. */
static int read_batch(fm_rules *e, rule_state *rs, batch *b)
{
    memset(b, 0, sizeof *b);
    b->rs = rs;
    b->last = rs->position;
    fm_store *st = e->ctx.st;
    int rc;
    switch (rs->src) {
    case FM_SRC_RECORDS:
        rc = fm_store_scan_records(st, rs->position, RULES_BATCH, on_record, b);
        break;
    case FM_SRC_LABELS:
        rc = fm_store_scan_labels(st, rs->position, RULES_BATCH, on_label, b);
        break;
    case FM_SRC_PRESENCE:
        rc = fm_store_presence_changes(st, rs->position, RULES_BATCH, on_presence, b);
        break;
    case FM_SRC_REGISTRY:
        rc = fm_store_events_after(st, rs->position, RULES_BATCH, on_registry, b);
        /* A device event may be any change; a revoked device (final) is
         * what device.revoked reports. Looked up after the scan, not
         * inside its callback. */
        for (size_t i = 0; !rc && i < b->ndev; i++) {
            fm_device d;
            if (fm_store_device_get(st, b->devices[i], &d) != 0 || strcmp(d.tenant, rs->tenant) != 0)
                continue;
            if (b->dev_kind[i] == FM_EVENT_PROVISIONED)
                batch_add(b, fm_event_from_provisioning(&d, b->dev_pos[i], fm_wall_ms()),
                          b->dev_pos[i]);
            else if (d.status == FM_DEVICE_REVOKED)
                batch_add(b, fm_event_from_revocation(&d, fm_wall_ms()), b->dev_pos[i]);
        }
        break;
    case FM_SRC_ALIASES:
        rc = fm_store_alias_log(st, rs->position, RULES_BATCH, on_alias, b);
        break;
    case FM_SRC_AUDIT:
        rc = fm_store_scan_audit(st, rs->position, RULES_BATCH, on_audit, b);
        break;
    case FM_SRC_LAKE:
        rc = fm_store_lake_objects(st, rs->position, RULES_BATCH, on_lake_object, b);
        break;
    default:
        rc = FM_EINVAL;
    }
    return rc;
}

/* ---- delivering one event ------------------------------------------------------ */

static void log_attempt(fm_rules *e, rule_state *rs, const char *target, const char *outcome,
                        int64_t us, const char *error)
{
    fm_rule_log l = {.tenant = rs->tenant,
                     .rule = rs->name,
                     .event_id = json_string_value(json_object_get(rs->ev, "id")),
                     .target = target,
                     .outcome = outcome,
                     .attempt = rs->attempt,
                     .duration_us = us,
                     .error = error ? error : ""};
    fm_errbuf err;
    if (fm_store_rule_log_add(e->ctx.st, &l, &err) != 0)
        fm_logkv(FM_LOG_WARN, "rules", "cannot record a delivery", "rule", rs->name, "error",
                 err.msg, NULL);
}

static void clear_pending(rule_state *rs)
{
    json_decref(rs->ev);
    json_decref(rs->outputs);
    rs->ev = rs->outputs = NULL;
    rs->done = 0;
    rs->attempt = 0;
    rs->retry_at_ms = 0;
    rs->last_error[0] = '\0';
}

/* After the last retry: the event, its outputs and the error go to
 * dead-letter/tenant=<t>/rule=<name>/date=.../<event id>.json. Only once
 * that object is written is the event handled. */
static int dead_letter(fm_rules *e, rule_state *rs, const char *error)
{
    char prefix[200], key[512];
    snprintf(prefix, sizeof prefix, "dead-letter/rule=%s", rs->name);
    json_t *doc = json_pack("{s:s,s:s,s:O,s:O,s:s,s:i,s:o}", "rule", rs->name, "tenant",
                            rs->tenant, "event", rs->ev, "outputs",
                            rs->outputs ? rs->outputs : json_array(), "error", error,
                            "attempts", rs->attempt, "failed_at", fm_json_time(fm_wall_ms()));
    char *text = doc ? json_dumps(doc, JSON_COMPACT) : NULL;
    json_decref(doc);
    fm_errbuf err;
    int rc = !text ? FM_ENOMEM
             : rules__object_key(key, sizeof key, prefix, rs->ev, 0) != 0
                 ? FM_EINVAL
                 : rules__lake_put(&e->ctx, key, text, &err);
    free(text);
    if (rc) {
        fm_logkv(FM_LOG_WARN, "rules", "cannot write a dead letter; will try again", "rule",
                 rs->name, "error", rc == FM_ENOMEM ? "out of memory" : err.msg, NULL);
        return rc;
    }
    log_attempt(e, rs, "dead-letter", "dead-lettered", 0, error);
    atomic_fetch_add(&rs->dead, 1);
    fm_logkv(FM_LOG_WARN, "rules", "event dead-lettered", "rule", rs->name, "event",
             json_string_value(json_object_get(rs->ev, "id")), "key", key, NULL);
    return 0;
}

/* One attempt at the pending event: every target that has not taken it yet.
 * 0 when the event is handled (delivered, or dead-lettered after the last
 * retry); FM_EBUSY when a retry is scheduled. */
static int attempt_pending(fm_rules *e, rule_state *rs)
{
    rs->attempt++;
    json_t *targets = json_object_get(rs->spec, "targets");
    size_t i;
    json_t *t;
    bool all = true;
    json_array_foreach(targets, i, t) {
        if (rs->done & (1u << i))
            continue;
        char name[96];
        const char *type = json_string_value(json_object_get(t, "type"));
        const char *fn = json_string_value(json_object_get(t, "function"));
        snprintf(name, sizeof name, "%s%s%s", type, fn ? ":" : "", fn ? fn : "");
        fm_errbuf err = {0};
        int64_t t0 = fm_mono_ns();
        int rc = rules__deliver(&e->ctx, t, rs->ev, rs->outputs, &err);
        int64_t us = (fm_mono_ns() - t0) / 1000;
        if (rc == 0) {
            rs->done |= 1u << i;
            atomic_fetch_add(&rs->delivered, 1);
            log_attempt(e, rs, name, "ok", us, NULL);
        } else {
            all = false;
            atomic_fetch_add(&rs->failed, 1);
            snprintf(rs->last_error, sizeof rs->last_error, "%s: %s", name, err.msg);
            log_attempt(e, rs, name, "failed", us, err.msg);
        }
    }
    if (all)
        return 0;
    if (rs->attempt > rs->retries) {
        if (dead_letter(e, rs, rs->last_error) == 0)
            return 0;
        /* The lake is down too: keep the event and try again later. */
    }
    int shift = rs->attempt - 1 < 10 ? rs->attempt - 1 : 10;
    rs->retry_at_ms = fm_wall_ms() + ((int64_t)e->opts.retry_base_ms << shift);
    return FM_EBUSY;
}

/* Handles events of the rule until its source has no more or a delivery
 * must wait for a retry. */
static void run_rule(fm_rules *e, rule_state *rs)
{
    if (rs->ev) {
        if (fm_wall_ms() < rs->retry_at_ms)
            return;
        if (attempt_pending(e, rs) != 0)
            return;
        rs->position = rs->ev_pos;
        clear_pending(rs);
    }
    for (int round = 0; round < 8; round++) {
        batch b;
        int rc = read_batch(e, rs, &b);
        bool stopped = false;
        size_t i = 0;
        for (; !rc && i < b.n && !stopped; i++) {
            json_t *ev = b.events[i];
            b.events[i] = NULL;
            atomic_fetch_add(&rs->events, 1);
            json_t *outputs = NULL;
            fm_errbuf err = {0};
            int prc = fm_rule_prog_run(rs->prog, ev, &outputs, &err);
            rs->ev = ev;
            rs->ev_pos = b.pos[i];
            rs->outputs = outputs;
            if (prc != 0) {
                /* The program fails on this event: it would fail again, so
                 * it is not retried but dead-lettered with jq's message. */
                rs->attempt = 1;
                if (dead_letter(e, rs, err.msg) != 0) {
                    rs->retry_at_ms = fm_wall_ms() + e->opts.retry_base_ms;
                    stopped = true;
                    continue;
                }
            } else if (json_array_size(outputs) == 0) {
                atomic_fetch_add(&rs->filtered_out, 1);
            } else if (attempt_pending(e, rs) != 0) {
                stopped = true;
                continue;
            }
            rs->position = b.pos[i];
            clear_pending(rs);
        }
        for (size_t k = i; k < b.n; k++)
            json_decref(b.events[k]);
        if (rc || stopped)
            break;
        /* Nothing pending: every row read, matching or not, is handled. */
        rs->position = b.last;
        if (b.rows < RULES_BATCH)
            break; /* caught up */
    }
    if (rs->position != rs->stored_position) {
        fm_errbuf err;
        int rc = fm_store_rule_position(e->ctx.st, rs->tenant, rs->name, rs->position, &err);
        if (rc == 0)
            rs->stored_position = rs->position;
        else if (rc != FM_ENOTFOUND)
            fm_logkv(FM_LOG_WARN, "rules", "cannot store a rule's position", "rule", rs->name,
                     "error", err.msg, NULL);
    }
}

/* ---- the rule set -------------------------------------------------------------- */

static void rule_free(rule_state *rs)
{
    if (!rs)
        return;
    clear_pending(rs);
    fm_rule_prog_free(rs->prog);
    json_decref(rs->spec);
    fm_free(rs->spec_text);
    fm_free(rs);
}

static rule_state *find_rule(fm_rules *e, const char *tenant, const char *name)
{
    for (size_t i = 0; i < e->n; i++)
        if (strcmp(e->rules[i]->tenant, tenant) == 0 && strcmp(e->rules[i]->name, name) == 0)
            return e->rules[i];
    return NULL;
}

/* (Re)builds a rule's compiled form from its stored document. */
static int rule_load(rule_state *rs, const fm_rule_row *row)
{
    json_t *spec = json_loads(row->spec_json, 0, NULL);
    fm_rule_prog *prog = NULL;
    fm_errbuf err;
    if (!spec || fm_rule_prog_compile(spec, &prog, &err) != 0) {
        json_decref(spec);
        fm_logkv(FM_LOG_WARN, "rules", "a stored rule does not compile; left out", "rule",
                 row->name, NULL);
        return FM_EINVAL;
    }
    char *text = fm_strdup(row->spec_json);
    if (!text) {
        json_decref(spec);
        fm_rule_prog_free(prog);
        return FM_ENOMEM;
    }
    clear_pending(rs);
    fm_rule_prog_free(rs->prog);
    json_decref(rs->spec);
    fm_free(rs->spec_text);
    rs->spec = spec;
    rs->prog = prog;
    rs->spec_text = text;
    rs->type = fm_event_type_parse(json_string_value(json_object_get(spec, "event")));
    rs->src = fm_event_type_source(rs->type);
    rs->enabled = json_is_true(json_object_get(spec, "enabled"));
    rs->retries = (int)json_integer_value(json_object_get(spec, "retries"));
    return 0;
}

static int on_row(void *ud, const fm_rule_row *row)
{
    fm_rules *e = ud;
    rule_state *rs = find_rule(e, row->tenant, row->name);
    if (rs) {
        rs->present = true;
        /* Edited or replayed: the document and the stored position are
         * taken again (an edit may redeliver what the last unstored batch
         * handled: at least once). */
        if (row->updated_ms != rs->updated_ms && rule_load(rs, row) == 0) {
            rs->updated_ms = row->updated_ms;
            rs->position = rs->stored_position = row->position;
        }
        return 0;
    }
    if (e->n >= RULES_MAX)
        return 0;
    rs = fm_calloc(1, sizeof *rs);
    if (!rs)
        return 0;
    snprintf(rs->tenant, sizeof rs->tenant, "%s", row->tenant);
    snprintf(rs->name, sizeof rs->name, "%s", row->name);
    rs->position = rs->stored_position = row->position;
    rs->updated_ms = row->updated_ms;
    rs->present = true;
    if (rule_load(rs, row) != 0) {
        fm_free(rs);
        return 0;
    }
    e->rules[e->n++] = rs;
    return 0;
}

static void reload(fm_rules *e)
{
    pthread_mutex_lock(&e->mu);
    for (size_t i = 0; i < e->n; i++)
        e->rules[i]->present = false;
    int rc = fm_store_rule_list(e->ctx.st, NULL, NULL, on_row, e);
    if (rc == 0) {
        size_t k = 0;
        for (size_t i = 0; i < e->n; i++) {
            if (e->rules[i]->present)
                e->rules[k++] = e->rules[i];
            else
                rule_free(e->rules[i]);
        }
        e->n = k;
    }
    pthread_mutex_unlock(&e->mu);
}

static void drop_all(fm_rules *e)
{
    pthread_mutex_lock(&e->mu);
    for (size_t i = 0; i < e->n; i++)
        rule_free(e->rules[i]);
    e->n = 0;
    pthread_mutex_unlock(&e->mu);
}

/* ---- lease and thread ---------------------------------------------------------- */

/* True while this node runs the rules. Losing the lease drops the rules'
 * in-memory state: positions are read again from the store when it comes
 * back, since another node may have moved them meanwhile. */
static bool hold_lease(fm_rules *e)
{
    int64_t now = fm_mono_ns() / 1000000;
    if (e->leader && now < e->lease_at_ms)
        return true;
    char owner[72];
    int rc = fm_store_lease(e->ctx.st, "rules", e->cfg.node_id, RULES_LEASE_MS, owner,
                            sizeof owner);
    bool was = e->leader;
    e->leader = rc == 0;
    if (e->leader) {
        e->lease_at_ms = now + RULES_LEASE_RENEW_MS;
        if (!was)
            fm_logkv(FM_LOG_INFO, "rules", "this node runs the rules", "node", e->cfg.node_id,
                     NULL);
    } else if (was) {
        fm_logkv(FM_LOG_WARN, "rules", "rules lease lost", "holder", owner, NULL);
        drop_all(e);
    }
    return e->leader;
}

static void *engine_main(void *arg)
{
    fm_rules *e = arg;
    fm_thread_lock(&e->thread);
    while (!fm_thread_should_stop(&e->thread)) {
        fm_thread_unlock(&e->thread);
        if (hold_lease(e)) {
            reload(e);
            for (size_t i = 0; i < e->n; i++)
                if (e->rules[i]->enabled)
                    run_rule(e, e->rules[i]);
        }
        fm_thread_lock(&e->thread);
        if (!fm_thread_should_stop(&e->thread))
            fm_thread_wait_ns(&e->thread, (int64_t)e->opts.poll_ms * 1000000);
    }
    fm_thread_unlock(&e->thread);
    return NULL;
}

/* ---- metrics ------------------------------------------------------------------- */

static void render(void *ud, fm_strbuf *b)
{
    fm_rules *e = ud;
    pthread_mutex_lock(&e->mu);
    fm_strbuf_printf(b, "# HELP fleetml_rule_events_total Events of a rule's type and tenant "
                        "read by the rules engine, by what became of them.\n"
                        "# TYPE fleetml_rule_events_total counter\n");
    for (size_t i = 0; i < e->n; i++) {
        rule_state *rs = e->rules[i];
        const struct {
            const char *what;
            uint64_t v;
        } rows[] = {{"read", atomic_load(&rs->events)},
                    {"filtered_out", atomic_load(&rs->filtered_out)},
                    {"dead_lettered", atomic_load(&rs->dead)}};
        for (size_t k = 0; k < sizeof rows / sizeof rows[0]; k++)
            fm_strbuf_printf(b, "fleetml_rule_events_total{tenant=\"%s\",rule=\"%s\",outcome=\"%s\"} %llu\n",
                             rs->tenant, rs->name, rows[k].what, (unsigned long long)rows[k].v);
    }
    fm_strbuf_printf(b, "# HELP fleetml_rule_deliveries_total Deliveries to a rule's targets, "
                        "by outcome.\n# TYPE fleetml_rule_deliveries_total counter\n");
    for (size_t i = 0; i < e->n; i++) {
        rule_state *rs = e->rules[i];
        fm_strbuf_printf(b, "fleetml_rule_deliveries_total{tenant=\"%s\",rule=\"%s\",outcome=\"ok\"} %llu\n"
                            "fleetml_rule_deliveries_total{tenant=\"%s\",rule=\"%s\",outcome=\"failed\"} %llu\n",
                         rs->tenant, rs->name, (unsigned long long)atomic_load(&rs->delivered),
                         rs->tenant, rs->name, (unsigned long long)atomic_load(&rs->failed));
    }
    fm_strbuf_printf(b, "# HELP fleetml_rules_leader 1 on the node that runs the rules.\n"
                        "# TYPE fleetml_rules_leader gauge\nfleetml_rules_leader %d\n",
                     e->leader ? 1 : 0);
    pthread_mutex_unlock(&e->mu);
}

/* ---- lifecycle ----------------------------------------------------------------- */

int fm_rules_start(const fm_rules_opts *opts, fm_rules **out, fm_errbuf *err)
{
    fm_rules *e = fm_calloc(1, sizeof *e);
    if (!e)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    e->opts = *opts;
    e->cfg = *opts->cfg;
    e->opts.cfg = &e->cfg;
    if (e->opts.poll_ms <= 0)
        e->opts.poll_ms = 250;
    if (e->opts.retry_base_ms <= 0)
        e->opts.retry_base_ms = 1000;
    e->ctx.lake = opts->lake;
    e->ctx.functions = opts->functions;
    e->ctx.loopback_webhooks = opts->loopback_webhooks;
    pthread_mutex_init(&e->mu, NULL);
    int rc = fm_store_open(&e->cfg, &e->ctx.st, err);
    if (rc) {
        pthread_mutex_destroy(&e->mu);
        fm_free(e);
        return rc;
    }
    if (fm_thread_start(&e->thread, "fm-rules", engine_main, e) != 0) {
        fm_store_close(e->ctx.st);
        pthread_mutex_destroy(&e->mu);
        fm_free(e);
        return fm_errf(err, FM_ENOMEM, "cannot start the rules thread");
    }
    fm_metrics_add_source(render, e);
    *out = e;
    return 0;
}

void fm_rules_stop(fm_rules *e)
{
    if (!e)
        return;
    fm_metrics_remove_source(render, e);
    fm_thread_stop(&e->thread);
    if (e->leader) {
        char owner[72];
        fm_store_lease(e->ctx.st, "rules", e->cfg.node_id, 0, owner, sizeof owner);
    }
    drop_all(e);
    if (e->ctx.curl)
        curl_easy_cleanup(e->ctx.curl);
    fm_store_close(e->ctx.st);
    pthread_mutex_destroy(&e->mu);
    fm_free(e);
}
