/*
 * Registry thread: queue of registry messages, the event-log follower that
 * keeps the broker plugin current, the snapshot file and the CRL.
 */
#include "registry/registry_int.h"
#include "fleetml/json.h"
#include "fleetml/measurement.h"
#include "fleetml/metrics.h"

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <openssl/rand.h>

#define EVENT_POLL_NS (200ull * 1000000ull)
#define GRACE_POLL_NS (1000ull * 1000000ull)
#define QUEUE_MAX 10000
#define CRL_DAYS 7

/* ---- snapshot ------------------------------------------------------------ */

typedef struct snap_ctx {
    fm_store *st;
    json_t *devices, *templates;
    int failed;
} snap_ctx;

static int add_serial(void *ud, const char *serial, int status, int64_t when)
{
    (void)status;
    (void)when;
    json_array_append_new((json_t *)ud, json_string(serial));
    return 0;
}

const char *fm_device_status_name(int st)
{
    return st == FM_DEVICE_ACTIVE ? "active" : st == FM_DEVICE_DISABLED ? "disabled" : "revoked";
}

json_t *fm_template_json(const fm_template *t)
{
    return json_pack("{s:s,s:s,s:s,s:s,s:i,s:b,s:i,s:s,s:b,s:s,s:o}", "name", t->name, "tenant",
                     t->tenant, "group", t->device_group, "device_prefix", t->device_prefix,
                     "cert_days", t->cert_days, "allow_reprovision", t->allow_reprovision,
                     "rate_per_min", t->rate_per_min, "status",
                     t->status == FM_TEMPLATE_ACTIVE ? "active" : "disabled", "has_allowlist",
                     t->has_allowlist, "hook", t->hook, "created_at", fm_json_time(t->created_ms));
}

json_t *fm_device_json(fm_store *st, const fm_device *d)
{
    fm_presence pr = {0};
    fm_store_presence_get(st, d->id, &pr);
    return json_pack("{s:s,s:s,s:s,s:s,s:s,s:s,s:s,s:o,s:b,s:o,s:o}", "id", d->id, "tenant",
                     d->tenant, "status", fm_device_status_name(d->status), "group",
                     d->device_group, "serial_number", d->serial_number, "model", d->model,
                     "firmware", d->firmware, "created_at", fm_json_time(d->created_ms),
                     "online", pr.online, "last_seen", fm_json_time(pr.last_seen_ms),
                     "cert_expires_at", fm_json_time(pr.cert_expires_ms));
}

static json_t *device_entry(fm_store *st, const fm_device *d)
{
    json_t *certs = json_array();
    if (!certs)
        return NULL;
    /* A revoked device has no usable certificate whatever the table says. */
    if (d->status != FM_DEVICE_REVOKED && fm_store_device_certs(st, d->id, add_serial, certs) != 0) {
        json_decref(certs);
        return NULL;
    }
    return json_pack("{s:s,s:o}", "status", fm_device_status_name(d->status), "certs", certs);
}

static json_t *template_entry(fm_store *st, const fm_template *t)
{
    json_t *certs = json_array();
    if (!certs)
        return NULL;
    if (fm_store_claim_certs(st, t->name, add_serial, certs) != 0) {
        json_decref(certs);
        return NULL;
    }
    return json_pack("{s:s,s:o}", "status", t->status == FM_TEMPLATE_ACTIVE ? "active" : "disabled",
                     "claim_certs", certs);
}

static int snap_device(void *ud, const fm_device *d)
{
    snap_ctx *c = ud;
    json_t *e = device_entry(c->st, d);
    if (!e || json_object_set_new(c->devices, d->id, e) != 0)
        c->failed = 1;
    return c->failed;
}

static int snap_template(void *ud, const fm_template *t)
{
    snap_ctx *c = ud;
    json_t *e = template_entry(c->st, t);
    if (!e || json_object_set_new(c->templates, t->name, e) != 0)
        c->failed = 1;
    return c->failed;
}

/* The plugin's view as one document (format 1): every device and template
 * with its status and certificate serials, and "seq", the registry event
 * log position read before them (so the document reflects at least every
 * event up to seq). 0 with *out set (caller's), or FM_ENOMEM / FM_EDB. */
static int snapshot_doc(fm_store *st, json_t **out, fm_errbuf *err)
{
    snap_ctx c = {.st = st, .devices = json_object(), .templates = json_object()};
    int64_t seq = 0;
    int rc = 0;
    *out = NULL;
    if (!c.devices || !c.templates)
        rc = fm_errf(err, FM_ENOMEM, "snapshot: out of memory");
    else if (fm_store_events_max(st, &seq) != 0 || fm_store_device_list(st, snap_device, &c) != 0 ||
             fm_store_template_list(st, snap_template, &c) != 0 || c.failed)
        rc = fm_errf(err, FM_EDB, "snapshot: cannot read the registry");
    else if (!(*out = json_pack("{s:i,s:I,s:O,s:O}", "format", 1, "seq", (json_int_t)seq,
                                "devices", c.devices, "templates", c.templates)))
        rc = fm_errf(err, FM_ENOMEM, "snapshot: out of memory");
    json_decref(c.devices);
    json_decref(c.templates);
    return rc;
}

int fm_registry_write_snapshot(const fm_config *cfg, fm_store *st, fm_errbuf *err)
{
    json_t *doc;
    int rc = snapshot_doc(st, &doc, err);
    if (rc)
        return rc;
    char *text = json_dumps(doc, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(doc);
    if (!text)
        return fm_errf(err, FM_ENOMEM, "snapshot: out of memory");
    char dir[PATH_MAX], path[PATH_MAX];
    fm_config_path(cfg, "broker", dir, sizeof dir);
    fm_config_path(cfg, "broker/registry.json", path, sizeof path);
    rc = fm_mkdirs(dir, 0750);
    if (!rc)
        rc = fm_write_file_atomic(path, text, strlen(text), 0644);
    fm_free(text);
    if (rc)
        rc = fm_errf(err, rc, "snapshot: cannot write %s", path);
    return rc;
}

/* Sends the whole view to the broker's plugin (external mode: the broker is
 * not ours and cannot read our snapshot file), in parts of about
 * SNAPSHOT_PART_BYTES of JSON so that no message nears the broker's packet
 * limit. The plugin assembles the parts of one "gen" (they arrive in order
 * on our session) and installs the view at the last one. */
#define SNAPSHOT_PART_BYTES (32 * 1024)

typedef struct part_ctx {
    fm_registry *r;
    json_t *doc; /* the whole snapshot */
    json_t **parts;
    size_t n, cap;
} part_ctx;

static json_t *new_part(part_ctx *p)
{
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 8;
        json_t **np = fm_realloc(p->parts, cap * sizeof *np);
        if (!np)
            return NULL;
        p->parts = np;
        p->cap = cap;
    }
    json_t *part = json_pack("{s:s,s:i,s:O,s:{},s:{}}", "op", "snapshot", "format", 1, "seq",
                             json_object_get(p->doc, "seq"), "devices", "templates");
    if (part)
        p->parts[p->n++] = part;
    return part;
}

static int split_snapshot(part_ctx *p)
{
    static const char *const kinds[] = {"devices", "templates"};
    json_t *part = new_part(p);
    size_t bytes = 0;
    for (int k = 0; k < 2 && part; k++) {
        const char *name;
        json_t *entry;
        json_object_foreach(json_object_get(p->doc, kinds[k]), name, entry) {
            char *text = json_dumps(entry, JSON_COMPACT);
            if (!text)
                return FM_ENOMEM;
            size_t len = strlen(text) + strlen(name) + 4;
            fm_free(text);
            if (bytes > 0 && bytes + len > SNAPSHOT_PART_BYTES) {
                if (!(part = new_part(p)))
                    return FM_ENOMEM;
                bytes = 0;
            }
            if (json_object_set(json_object_get(part, kinds[k]), name, entry) != 0)
                return FM_ENOMEM;
            bytes += len;
        }
    }
    return part ? 0 : FM_ENOMEM;
}

static void push_snapshot(fm_registry *r)
{
    fm_errbuf err;
    part_ctx p = {.r = r};
    if (snapshot_doc(r->store, &p.doc, &err) != 0) {
        fm_logkv(FM_LOG_ERROR, "registry", "snapshot failed", "error", err.msg, NULL);
        return;
    }
    char gen[48];
    unsigned char rnd[8];
    if (RAND_bytes(rnd, sizeof rnd) != 1)
        memset(rnd, 0, sizeof rnd);
    snprintf(gen, sizeof gen, "%.24s-%02x%02x%02x%02x%02x%02x%02x%02x", r->cfg.node_id, rnd[0],
             rnd[1], rnd[2], rnd[3], rnd[4], rnd[5], rnd[6], rnd[7]);
    if (split_snapshot(&p) != 0) {
        fm_logf(FM_LOG_ERROR, "registry", "snapshot: out of memory");
    } else {
        for (size_t i = 0; i < p.n; i++) {
            json_object_set_new(p.parts[i], "gen", json_string(gen));
            json_object_set_new(p.parts[i], "part", json_integer((json_int_t)i));
            json_object_set_new(p.parts[i], "parts", json_integer((json_int_t)p.n));
            registry__publish(r, FM_CONTROL_TOPIC, p.parts[i], NULL, 0); /* takes it */
            p.parts[i] = NULL;
        }
        char nparts[24];
        snprintf(nparts, sizeof nparts, "%zu", p.n);
        fm_logkv(FM_LOG_INFO, "registry", "sent the registry to the broker", "parts", nparts,
                 "gen", gen, NULL);
    }
    for (size_t i = 0; i < p.n; i++)
        json_decref(p.parts[i]);
    fm_free(p.parts);
    json_decref(p.doc);
}

/* ---- CRL ----------------------------------------------------------------- */

typedef struct crl_ctx {
    fm_revoked *list;
    char (*serials)[64];
    size_t n, cap;
    int failed;
} crl_ctx;

static int crl_add(void *ud, const char *serial, int status, int64_t when)
{
    (void)status;
    crl_ctx *c = ud;
    if (c->n == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 64;
        fm_revoked *nl = fm_realloc(c->list, cap * sizeof *nl);
        if (nl)
            c->list = nl;
        char(*ns)[64] = fm_realloc(c->serials, cap * sizeof *ns);
        if (ns)
            c->serials = ns;
        if (!nl || !ns) {
            c->failed = 1;
            return 1;
        }
        c->cap = cap;
    }
    snprintf(c->serials[c->n], 64, "%s", serial);
    c->list[c->n].revoked_ms = when;
    c->n++;
    return 0;
}

static int write_crl(fm_registry *r, fm_errbuf *err)
{
    crl_ctx c = {0};
    int rc = fm_store_revoked_certs(r->store, crl_add, &c);
    if (!rc && c.failed)
        rc = FM_ENOMEM;
    if (!rc) {
        /* The serial strings moved while growing; point at them now. */
        for (size_t i = 0; i < c.n; i++)
            c.list[i].serial_hex = c.serials[i];
        char path[PATH_MAX];
        fm_config_path(&r->cfg, "pki/crl.pem", path, sizeof path);
        rc = fm_ca_write_crl(r->ca, c.list, c.n, CRL_DAYS, path, err);
    } else {
        fm_errf(err, rc, "CRL: cannot read revoked certificates");
    }
    fm_free(c.list);
    fm_free(c.serials);
    return rc;
}

/* ---- pushes to the broker plugin ------------------------------------------ */

void registry__publish(fm_registry *r, const char *topic, json_t *doc, const void *corr,
                       size_t corr_len)
{
    char *text = doc ? json_dumps(doc, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(doc);
    if (!text) {
        fm_logf(FM_LOG_ERROR, "registry", "out of memory publishing to %s", topic);
        return;
    }
    int rc = r->opts.publish(r->opts.ud, topic, text, strlen(text), corr, corr_len);
    if (rc != 0)
        fm_logkv(FM_LOG_WARN, "registry", "publish failed", "topic", topic, "error",
                 fm_strerror(rc), NULL);
    fm_free(text);
}

void registry__push_device(fm_registry *r, const char *id)
{
    fm_device d;
    int rc = fm_store_device_get(r->store, id, &d);
    json_t *msg;
    if (rc == FM_ENOTFOUND) {
        msg = json_pack("{s:s,s:s,s:I}", "op", "device_remove", "id", id, "seq",
                        (json_int_t)r->event_seq);
    } else if (rc == 0) {
        json_t *e = device_entry(r->store, &d);
        msg = e ? json_pack("{s:s,s:s,s:O,s:O,s:I}", "op", "device", "id", id, "status",
                            json_object_get(e, "status"), "certs", json_object_get(e, "certs"),
                            "seq", (json_int_t)r->event_seq)
                : NULL;
        json_decref(e);
    } else {
        fm_logkv(FM_LOG_WARN, "registry", "cannot read device", "device", id, NULL);
        return;
    }
    registry__publish(r, FM_CONTROL_TOPIC, msg, NULL, 0);
}

void registry__push_template(fm_registry *r, const char *name)
{
    fm_template t;
    if (fm_store_template_get(r->store, name, &t) != 0)
        return;
    json_t *e = template_entry(r->store, &t);
    json_t *msg = e ? json_pack("{s:s,s:s,s:O,s:O,s:I}", "op", "template", "name", name,
                                "status", json_object_get(e, "status"), "claim_certs",
                                json_object_get(e, "claim_certs"), "seq",
                                (json_int_t)r->event_seq)
                    : NULL;
    json_decref(e);
    registry__publish(r, FM_CONTROL_TOPIC, msg, NULL, 0);
}

void registry__push_delta(fm_registry *r, const char *id)
{
    fm_shadow sh;
    if (fm_store_shadow_get(r->store, id, &sh) != 0)
        return;
    json_t *des = json_loads(sh.desired, 0, NULL), *rep = json_loads(sh.reported, 0, NULL);
    json_t *delta = (des && rep) ? fm_shadow_delta(des, rep) : NULL;
    if (delta && json_object_size(delta) > 0) {
        char topic[128];
        snprintf(topic, sizeof topic, "fleet/%s/shadow/delta", id);
        registry__publish(r, topic,
                          json_pack("{s:O,s:I}", "state", delta, "version", (json_int_t)sh.version),
                          NULL, 0);
    }
    json_decref(delta);
    json_decref(des);
    json_decref(rep);
    fm_shadow_clear(&sh);
}

/* ---- event log ------------------------------------------------------------- */

static int on_event(void *ud, int64_t seq, int kind, const char *subject)
{
    fm_registry *r = ud;
    r->event_seq = seq;
    switch (kind) {
    case FM_EVENT_DEVICE:
        registry__push_device(r, subject);
        if (r->opts.device_changed)
            r->opts.device_changed(r->opts.ud, subject);
        r->snapshot_dirty = r->crl_dirty = 1;
        break;
    case FM_EVENT_TEMPLATE:
        registry__push_template(r, subject);
        r->snapshot_dirty = 1;
        break;
    case FM_EVENT_SHADOW:
        registry__push_delta(r, subject);
        break;
    default:
        break;
    }
    return 0;
}

static void housekeeping(fm_registry *r, int resync)
{
    fm_errbuf err;
    uint64_t now = fm_mono_ns();
    if (now >= r->next_grace_ns) {
        long n = 0;
        if (fm_store_expire_grace(r->store, fm_wall_ms(), &n, &err) != 0)
            fm_logkv(FM_LOG_WARN, "registry", "grace expiry failed", "error", err.msg, NULL);
        else if (n > 0)
            fm_logf(FM_LOG_INFO, "registry", "%ld rotated certificate(s) reached the end of "
                                             "their grace period", n);
        r->next_grace_ns = now + GRACE_POLL_NS;
    }
    /* The supervised broker died: every device it had is offline (no
     * disconnect reports came). Reports from after the death are kept. */
    int64_t lost = atomic_load(&fm_metrics_get()->broker_lost_ms);
    if (lost > r->broker_lost_ms) {
        registry__presence_flush(r);
        if (fm_store_presence_reset(r->store, r->cfg.node_id, lost) == 0)
            r->broker_lost_ms = lost;
    }
    /* Follow the log in chunks until caught up. */
    for (;;) {
        int64_t before = r->event_seq;
        if (fm_store_events_after(r->store, r->event_seq, 256, on_event, r) != 0) {
            fm_logf(FM_LOG_WARN, "registry", "cannot read the registry event log");
            break;
        }
        if (r->event_seq == before)
            break;
    }
    if (r->snapshot_dirty || resync) {
        if (fm_registry_write_snapshot(&r->cfg, r->store, &err) != 0)
            fm_logkv(FM_LOG_ERROR, "registry", "snapshot failed", "error", err.msg, NULL);
        else
            r->snapshot_dirty = 0;
    }
    /* After a (re)connect the broker may be a new process: our supervised
     * one rereads the file we just wrote; an external one gets the view in
     * the message. */
    if (resync && strcmp(r->cfg.broker_mode, "external") == 0)
        push_snapshot(r);
    else if (resync)
        registry__publish(r, FM_CONTROL_TOPIC, json_pack("{s:s}", "op", "reload"), NULL, 0);
    if (r->crl_dirty) {
        if (write_crl(r, &err) != 0)
            fm_logkv(FM_LOG_ERROR, "registry", "CRL update failed", "error", err.msg, NULL);
        else
            r->crl_dirty = 0;
    }
}

/* ---- thread and queue -------------------------------------------------------- */

static void regmsg_free(regmsg *m)
{
    if (!m)
        return;
    fm_free(m->topic);
    fm_free(m->payload);
    fm_free(m->response_topic);
    fm_free(m->corr);
    fm_free(m->claim_template);
    fm_free(m->cert_serial);
    fm_free(m);
}

static void *run(void *arg)
{
    fm_registry *r = arg;
    uint64_t next_poll = 0;
    fm_thread_lock(&r->thread);
    for (;;) {
        while (!r->head && !fm_thread_should_stop(&r->thread) && !r->resync &&
               fm_mono_ns() < next_poll)
            fm_thread_wait_ns(&r->thread, (int64_t)(next_poll - fm_mono_ns()));
        if (fm_thread_should_stop(&r->thread))
            break;
        regmsg *m = r->head;
        if (m) {
            r->head = m->next;
            if (!r->head)
                r->tail = NULL;
            r->depth--;
        }
        int resync = r->resync;
        r->resync = 0;
        fm_thread_unlock(&r->thread);
        if (m) {
            registry__handle(r, m);
            regmsg_free(m);
            fm_thread_lock(&r->thread);
            bool drained = r->head == NULL;
            fm_thread_unlock(&r->thread);
            if (drained)
                registry__presence_flush(r);
        }
        if (resync || fm_mono_ns() >= next_poll) {
            housekeeping(r, resync);
            next_poll = fm_mono_ns() + EVENT_POLL_NS;
        }
        fm_thread_lock(&r->thread);
    }
    fm_thread_unlock(&r->thread);
    registry__presence_flush(r);
    return NULL;
}

int fm_registry_start(const fm_registry_opts *opts, fm_registry **out, fm_errbuf *err)
{
    fm_registry *r = fm_calloc(1, sizeof *r);
    if (!r)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    r->opts = *opts;
    r->cfg = *opts->cfg;
    r->opts.cfg = &r->cfg;
    char key[PATH_MAX], crt[PATH_MAX];
    int rc = fm_ratelimit_new(&r->rates);
    if (rc) {
        fm_errf(err, rc, "out of memory");
        goto fail;
    }
    rc = fm_store_open(&r->cfg, &r->store, err);
    if (rc)
        goto fail;
    rc = fm_ca_load(fm_config_path(&r->cfg, "pki/ca.key", key, sizeof key),
                    fm_config_path(&r->cfg, "pki/ca.crt", crt, sizeof crt), &r->ca, err);
    if (rc)
        goto fail;
    /* Everything before now is in the snapshot written below. */
    if ((rc = fm_store_events_max(r->store, &r->event_seq)) != 0) {
        fm_errf(err, rc, "cannot read the registry event log");
        goto fail;
    }
    if ((rc = fm_registry_write_snapshot(&r->cfg, r->store, err)) != 0 ||
        (rc = write_crl(r, err)) != 0)
        goto fail;
    if (opts->reset_presence &&
        (rc = fm_store_presence_reset(r->store, r->cfg.node_id, fm_wall_ms())) != 0) {
        fm_errf(err, rc, "cannot reset device presence");
        goto fail;
    }
    if (fm_thread_start(&r->thread, "fm-registry", run, r) != 0) {
        rc = fm_errf(err, FM_ENOMEM, "cannot start registry thread");
        goto fail;
    }
    *out = r;
    return 0;
fail:
    fm_ca_free(r->ca);
    fm_store_close(r->store);
    fm_ratelimit_free(r->rates);
    fm_free(r);
    return rc;
}

int fm_registry_handles(const char *topic)
{
    if (strncmp(topic, FM_PRESENCE_ROOT, strlen(FM_PRESENCE_ROOT)) == 0)
        return 1;
    if (strncmp(topic, "fleet/", 6) != 0)
        return 0;
    const char *rest = topic + 6;
    if (strncmp(rest, "provisioning/", 13) == 0) {
        const char *slash = strchr(rest + 13, '/');
        return slash && strcmp(slash, "/request") == 0;
    }
    const char *slash = strchr(rest, '/');
    if (!slash)
        return 0;
    return strcmp(slash, "/cert/rotate") == 0 || strcmp(slash, "/shadow/update") == 0 ||
           strcmp(slash, "/shadow/get") == 0;
}

static char *dup_opt(const char *s) { return s ? fm_strdup(s) : NULL; }

int fm_registry_submit(fm_registry *r, const fm_regmsg_in *in)
{
    regmsg *m = fm_calloc(1, sizeof *m);
    if (!m)
        return FM_ENOMEM;
    m->topic = fm_strdup(in->topic);
    m->payload = fm_malloc(in->len + 1);
    m->response_topic = dup_opt(in->response_topic);
    m->claim_template = dup_opt(in->claim_template);
    m->cert_serial = dup_opt(in->cert_serial);
    if (in->corr && in->corr_len) {
        m->corr = fm_malloc(in->corr_len);
        if (m->corr)
            memcpy(m->corr, in->corr, in->corr_len);
        m->corr_len = in->corr_len;
    }
    if (!m->topic || !m->payload || (in->response_topic && !m->response_topic) ||
        (in->claim_template && !m->claim_template) || (in->cert_serial && !m->cert_serial) ||
        (in->corr_len && !m->corr)) {
        regmsg_free(m);
        return FM_ENOMEM;
    }
    if (in->len)
        memcpy(m->payload, in->payload, in->len);
    m->payload[in->len] = '\0';
    m->len = in->len;
    fm_thread_lock(&r->thread);
    if (r->depth >= QUEUE_MAX || fm_thread_should_stop(&r->thread)) {
        fm_thread_unlock(&r->thread);
        regmsg_free(m);
        return FM_EBUSY;
    }
    if (r->tail)
        r->tail->next = m;
    else
        r->head = m;
    r->tail = m;
    r->depth++;
    fm_thread_wake(&r->thread);
    fm_thread_unlock(&r->thread);
    return 0;
}

void fm_registry_resync(fm_registry *r)
{
    fm_thread_lock(&r->thread);
    r->resync = 1;
    fm_thread_wake(&r->thread);
    fm_thread_unlock(&r->thread);
}

void fm_registry_stop(fm_registry *r)
{
    if (!r)
        return;
    fm_thread_stop(&r->thread);
    while (r->head) {
        regmsg *m = r->head;
        r->head = m->next;
        regmsg_free(m);
    }
    fm_ca_free(r->ca);
    fm_store_close(r->store);
    fm_ratelimit_free(r->rates);
    fm_free(r);
}

int registry__rate_take(fm_registry *r, const char *name, int per_min)
{
    if (per_min <= 0)
        return 0;
    return fm_ratelimit_take(r->rates, name, per_min / 60.0, per_min, fm_mono_ns()) ? 0 : FM_EBUSY;
}

int fm_registry_device_id(const char *prefix, const char *serial, char *out, size_t len)
{
    char buf[128];
    int n = snprintf(buf, sizeof buf, "%s-", prefix);
    if (n < 0 || (size_t)n >= sizeof buf)
        return FM_EINVAL;
    size_t i = (size_t)n;
    for (const char *p = serial; *p && i + 1 < sizeof buf; p++) {
        char c = *p;
        if (c >= 'A' && c <= 'Z')
            c = (char)(c - 'A' + 'a');
        buf[i++] = ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-') ? c : '-';
    }
    buf[i > 64 ? 64 : i] = '\0';
    if (!fm_device_id_valid(buf) || strlen(buf) + 1 > len)
        return FM_EINVAL;
    memcpy(out, buf, strlen(buf) + 1);
    return 0;
}
