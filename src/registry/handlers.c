/*
 * Registry message handlers: provisioning by claim, certificate rotation
 * and device shadows. Each answers on the topics of the device contract
 * (docs/protocol.md) and never leaves a half-done change behind: the store
 * commit is the single point where a change becomes real, and the broker
 * plugin hears of it before the device does.
 */
#include "fleetml/contract.h"
#include "fleetml/measurement.h"
#include "fleetml/metrics.h"
#include "registry/registry_int.h"

#include <stdio.h>
#include <string.h>

#define HOOK_TIMEOUT_MS 5000
#define CSR_MAX 16384

/* ---- provisioning ----------------------------------------------------------- */

static void prov_reply(fm_registry *r, const char *client, const char *leaf, json_t *doc)
{
    char topic[160];
    snprintf(topic, sizeof topic, "fleet/provisioning/%s/%s", client, leaf);
    registry__publish(r, topic, doc, NULL, 0);
}

static void prov_reject(fm_registry *r, const char *client, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void prov_reject(fm_registry *r, const char *client, const char *code, const char *fmt, ...)
{
    char msg[300];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fm_logkv(FM_LOG_INFO, "registry", "provisioning rejected", "client", client, "code", code,
             "reason", msg, NULL);
    prov_reply(r, client, "rejected", json_pack("{s:s,s:s}", "code", code, "message", msg));
}

static void prov_accept(fm_registry *r, const char *client, const char *device_id,
                        const char *cert_pem)
{
    int port = r->cfg.broker_public_port ? r->cfg.broker_public_port : r->cfg.broker_port;
    prov_reply(r, client, "accepted",
               json_pack("{s:s,s:s,s:s,s:{s:s,s:i}}", "device_id", device_id, "certificate_pem",
                         cert_pem, "ca_pem", fm_ca_cert_pem(r->ca), "endpoint", "host",
                         r->cfg.broker_public_host, "port", port));
}

/* Asks the template's hook; returns 1 when allowed (and applies
 * overrides), 0 when denied (reason filled). */
static int ask_hook(const fm_template *t, const char *client, const char *serial,
                    const char *model, const char *firmware, char *device_id, size_t id_len,
                    char *group, size_t group_len, char *reason, size_t reason_len)
{
    json_t *req = json_pack("{s:s,s:s,s:s,s:s,s:s,s:s,s:s}", "template", t->name, "tenant",
                            t->tenant, "serial", serial, "client_id", client, "device_id",
                            device_id, "model", model, "firmware", firmware);
    json_t *resp = NULL;
    fm_errbuf err;
    int rc = req ? fm_registry_run_hook(t->hook, req, HOOK_TIMEOUT_MS, &resp, &err)
                 : fm_errf(&err, FM_ENOMEM, "out of memory");
    json_decref(req);
    if (rc) {
        snprintf(reason, reason_len, "pre-provisioning hook failed: %.200s", err.msg);
        return 0;
    }
    int allow = json_is_true(json_object_get(resp, "allow"));
    const char *why = json_string_value(json_object_get(resp, "reason"));
    const char *id = json_string_value(json_object_get(resp, "device_id"));
    const char *grp = json_string_value(json_object_get(resp, "device_group"));
    if (!allow) {
        snprintf(reason, reason_len, "denied by the pre-provisioning hook%s%.200s",
                 why ? ": " : "", why ? why : "");
    } else if (id && !fm_device_id_valid(id)) {
        snprintf(reason, reason_len, "the hook's device_id override '%.64s' is not valid", id);
        allow = 0;
    } else {
        if (id)
            snprintf(device_id, id_len, "%s", id);
        if (grp)
            snprintf(group, group_len, "%.64s", grp);
    }
    json_decref(resp);
    return allow;
}

static void handle_provision(fm_registry *r, const regmsg *m)
{
    /* fleet/provisioning/<client>/request */
    char client[96];
    const char *start = m->topic + strlen("fleet/provisioning/");
    const char *end = strchr(start, '/');
    if (!end || (size_t)(end - start) >= sizeof client)
        return;
    snprintf(client, sizeof client, "%.*s", (int)(end - start), start);
    if (!m->claim_template) {
        /* Only the broker plugin sets this property, and only for claim
         * certificates: anything else here is not a claim connection. */
        prov_reject(r, client, "invalid_request", "not a claim-certificate connection");
        return;
    }
    fm_provision_request req;
    char code[32] = "";
    fm_errbuf err;
    if (fm_provision_request_parse(m->payload, m->len, client, &req, code, sizeof code, &err) !=
        0) {
        prov_reject(r, client, code[0] ? code : "invalid_request", "%s", err.msg);
        return;
    }
    const char *serial = req.serial, *model = req.model, *firmware = req.firmware;

    fm_template t;
    if (fm_store_template_get(r->store, m->claim_template, &t) != 0 ||
        t.status != FM_TEMPLATE_ACTIVE) {
        prov_reject(r, client, "template_disabled", "template '%s' is not active",
                    m->claim_template);
        goto out;
    }
    if (registry__rate_take(r, t.name, t.rate_per_min) != 0) {
        prov_reject(r, client, "rate_limited", "template '%s' allows %d requests per minute",
                    t.name, t.rate_per_min);
        goto out;
    }
    fm_csr *csr = NULL;
    if (fm_csr_parse(req.csr_pem, req.csr_len, &csr, code, &err) != 0) {
        prov_reject(r, client, code[0] ? code : "invalid_csr", "csr: %s", err.msg);
        goto out;
    }
    int allowed = fm_store_template_serial_allowed(r->store, t.name, serial);
    if (allowed != 1) {
        if (allowed == 0)
            prov_reject(r, client, "serial_not_allowed",
                        "serial '%s' is not on template '%s''s allow-list", serial, t.name);
        else
            prov_reject(r, client, "unavailable", "registry unavailable, retry later");
        goto out_csr;
    }

    char device_id[65] = "", group[65];
    snprintf(group, sizeof group, "%s", t.device_group);
    char *existing_pem = NULL;
    int reprovision = 0;
    int rc = fm_store_provision_lookup(r->store, serial, device_id, sizeof device_id,
                                       &existing_pem);
    if (rc == 0) {
        /* The same device asking again (its answer was lost) gets the same
         * certificate: retries must be safe. A different key is a second
         * device claiming the serial, or a reset device. */
        if (existing_pem && fm_csr_matches_cert_pem(csr, existing_pem) == 1) {
            prov_accept(r, client, device_id, existing_pem);
            fm_free(existing_pem);
            goto out_csr;
        }
        fm_free(existing_pem);
        if (!t.allow_reprovision) {
            prov_reject(r, client, "already_provisioned",
                        "serial '%s' is already provisioned as device '%s'", serial, device_id);
            goto out_csr;
        }
        reprovision = 1;
    } else if (rc == FM_ENOTFOUND) {
        if (fm_registry_device_id(t.device_prefix, serial, device_id, sizeof device_id) != 0) {
            prov_reject(r, client, "invalid_request", "cannot derive a device id from serial '%s'",
                        serial);
            goto out_csr;
        }
    } else {
        prov_reject(r, client, "unavailable", "registry unavailable, retry later");
        goto out_csr;
    }

    /* One key, one device: a second device presenting a key another device
     * holds is a clone (or a copied key), not a new device. */
    char key_id[FM_KEY_ID_LEN + 1], owner[65];
    if (fm_csr_key_id(csr, key_id, sizeof key_id) != 0) {
        prov_reject(r, client, "invalid_csr", "csr: cannot read its public key");
        goto out_csr;
    }
    rc = fm_store_key_owner(r->store, key_id, owner, sizeof owner);
    if (rc == 0 && strcmp(owner, device_id) != 0) {
        prov_reject(r, client, "key_reused", "this public key already belongs to another device");
        fm_logkv(FM_LOG_WARN, "registry", "provisioning refused: key already bound", "serial",
                 serial, "owner", owner, NULL);
        goto out_csr;
    }
    if (rc != 0 && rc != FM_ENOTFOUND) {
        prov_reject(r, client, "unavailable", "registry unavailable, retry later");
        goto out_csr;
    }

    if (t.hook[0]) {
        char reason[300];
        if (!ask_hook(&t, client, serial, model, firmware, device_id, sizeof device_id, group,
                      sizeof group, reason, sizeof reason)) {
            prov_reject(r, client, "hook_denied", "%s", reason);
            goto out_csr;
        }
    }

    char *cert_pem = NULL, cert_serial[64];
    int64_t not_after = 0;
    if (fm_ca_sign_csr(r->ca, csr, device_id, FM_CERT_CLIENT, t.cert_days, &cert_pem, cert_serial,
                       &not_after, &err) != 0) {
        fm_logkv(FM_LOG_ERROR, "registry", "signing failed", "error", err.msg, NULL);
        prov_reject(r, client, "internal", "could not issue the certificate, retry later");
        goto out_csr;
    }
    fm_provision p = {.template_name = t.name, .serial_number = serial, .device_id = device_id,
                      .tenant = t.tenant, .device_group = group, .model = model,
                      .firmware = firmware, .cert_serial = cert_serial, .cert_pem = cert_pem,
                      .not_after_ms = not_after, .reprovision = reprovision,
                      .key_id = key_id};
    /* The certificate becomes usable only with this commit: a crash before
     * it leaves a signed certificate that no broker accepts, and the
     * device simply asks again. */
    rc = fm_store_provision_commit(r->store, &p, &err);
    if (rc == 0) {
        /* The plugin learns the device before the device learns its id. */
        registry__push_device(r, device_id);
        r->snapshot_dirty = r->crl_dirty = 1;
        prov_accept(r, client, device_id, cert_pem);
        fm_logkv(FM_LOG_INFO, "registry", reprovision ? "device re-provisioned" : "device provisioned",
                 "device", device_id, "template", t.name, "serial", serial, NULL);
    } else if (rc == FM_EEXIST) {
        prov_reject(r, client, "conflict", "%s", err.msg);
    } else if (rc == FM_EPERM) {
        prov_reject(r, client, "device_revoked", "%s", err.msg);
    } else {
        prov_reject(r, client, "unavailable", "could not store the registration, retry later");
    }
    fm_free(cert_pem);
out_csr:
    fm_csr_free(csr);
out:
    fm_provision_request_free(&req);
}

/* ---- rotation -------------------------------------------------------------------- */

/* fleet/<device>/<rest> -> device id; 0 when the topic is malformed. */
static int topic_device(const char *topic, char *out, size_t len)
{
    const char *start = topic + strlen("fleet/");
    const char *end = strchr(start, '/');
    if (!end || (size_t)(end - start) >= len)
        return 0;
    snprintf(out, len, "%.*s", (int)(end - start), start);
    return fm_device_id_valid(out);
}

static void cert_reject(fm_registry *r, const char *dev, const char *code, const char *msg)
{
    char topic[128];
    snprintf(topic, sizeof topic, "fleet/%s/cert/rejected", dev);
    registry__publish(r, topic, json_pack("{s:s,s:s}", "code", code, "message", msg), NULL, 0);
}

static void handle_rotate(fm_registry *r, const regmsg *m)
{
    char dev[65];
    if (!topic_device(m->topic, dev, sizeof dev))
        return;
    fm_device d;
    if (fm_store_device_get(r->store, dev, &d) != 0 || d.status != FM_DEVICE_ACTIVE) {
        cert_reject(r, dev, "device_inactive", "device is not active");
        return;
    }
    json_t *doc = json_loadb(m->payload, m->len, JSON_REJECT_DUPLICATES, NULL);
    const char *csr_pem = json_string_value(json_object_get(doc, "csr"));
    fm_csr *csr = NULL;
    char code[32] = "";
    fm_errbuf err;
    if (!csr_pem || json_string_length(json_object_get(doc, "csr")) > CSR_MAX) {
        cert_reject(r, dev, "invalid_request", "csr: expected a PEM certificate request");
        goto out;
    }
    if (fm_csr_parse(csr_pem, strlen(csr_pem), &csr, code, &err) != 0) {
        cert_reject(r, dev, code[0] ? code : "invalid_csr", err.msg);
        goto out;
    }
    char key_id[FM_KEY_ID_LEN + 1], owner[65];
    if (fm_csr_key_id(csr, key_id, sizeof key_id) != 0) {
        cert_reject(r, dev, "invalid_csr", "csr: cannot read its public key");
        goto out;
    }
    int krc = fm_store_key_owner(r->store, key_id, owner, sizeof owner);
    if (krc == 0 && strcmp(owner, dev) != 0) {
        cert_reject(r, dev, "key_reused", "this public key already belongs to another device");
        goto out;
    }
    if (krc != 0 && krc != FM_ENOTFOUND) {
        cert_reject(r, dev, "unavailable", "registry unavailable, retry later");
        goto out;
    }
    char *pem = NULL, serial[64];
    int64_t not_after = 0;
    if (fm_ca_sign_csr(r->ca, csr, dev, FM_CERT_CLIENT, r->cfg.device_cert_days, &pem, serial,
                       &not_after, &err) != 0) {
        cert_reject(r, dev, "internal", "could not issue the certificate, retry later");
        goto out;
    }
    int64_t grace_until = fm_wall_ms() + (int64_t)r->cfg.rotation_grace_s * 1000;
    /* The serial of the certificate this connection uses, stamped by the
     * broker plugin (devices cannot forge it). */
    const char *old = m->cert_serial ? m->cert_serial : "";
    if (fm_store_rotate_commit(r->store, dev, serial, pem, key_id, not_after, old, grace_until,
                               &err) != 0) {
        cert_reject(r, dev, "unavailable", "could not store the new certificate, retry later");
    } else {
        registry__push_device(r, dev);
        r->snapshot_dirty = 1;
        char topic[128], until[40];
        snprintf(topic, sizeof topic, "fleet/%s/cert/accepted", dev);
        registry__publish(r, topic,
                          json_pack("{s:s,s:s,s:s}", "certificate_pem", pem, "ca_pem",
                                    fm_ca_cert_pem(r->ca), "old_certificate_valid_until",
                                    fm_rfc3339(grace_until, until, sizeof until)),
                          NULL, 0);
        fm_logkv(FM_LOG_INFO, "registry", "certificate rotated", "device", dev, "serial", serial,
                 NULL);
    }
    fm_free(pem);
out:
    fm_csr_free(csr);
    json_decref(doc);
}

/* ---- shadow -------------------------------------------------------------------- */

static void shadow_reply(fm_registry *r, const regmsg *m, const char *dev, const char *leaf,
                         json_t *doc)
{
    char topic[256];
    fm_reply_topic(dev, m->response_topic, leaf, topic, sizeof topic);
    registry__publish(r, topic, doc, m->corr, m->corr_len);
}

static void shadow_reject(fm_registry *r, const regmsg *m, const char *dev, const char *code,
                          const char *msg)
{
    shadow_reply(r, m, dev, "shadow/rejected",
                 json_pack("{s:s,s:s}", "code", code, "message", msg));
}

static json_t *shadow_document(const fm_shadow *sh, json_t *des, json_t *rep)
{
    char ts[40];
    return json_pack("{s:{s:O,s:O},s:I,s:s}", "state", "desired", des, "reported", rep, "version",
                     (json_int_t)sh->version, "updated_at",
                     sh->updated_ms ? fm_rfc3339(sh->updated_ms, ts, sizeof ts) : "");
}

static void handle_shadow(fm_registry *r, const regmsg *m, int update)
{
    char dev[65];
    if (!topic_device(m->topic, dev, sizeof dev))
        return;
    fm_shadow sh;
    json_t *des = NULL, *rep = NULL, *doc = NULL;
    if (fm_store_shadow_get(r->store, dev, &sh) != 0) {
        shadow_reject(r, m, dev, "unavailable", "shadow store unavailable, retry later");
        return;
    }
    des = json_loads(sh.desired, 0, NULL);
    rep = json_loads(sh.reported, 0, NULL);
    if (!des || !rep) {
        shadow_reject(r, m, dev, "internal", "stored shadow is unreadable");
        goto out;
    }
    if (update) {
        if (m->len > FM_SHADOW_MAX_BYTES) {
            shadow_reject(r, m, dev, "too_large", "update is larger than 8192 bytes");
            goto out;
        }
        doc = json_loadb(m->payload, m->len, JSON_REJECT_DUPLICATES, NULL);
        json_t *patch = json_object_get(doc, "reported");
        if (!json_is_object(doc) || !json_is_object(patch)) {
            shadow_reject(r, m, dev, "invalid_request",
                          "expected {\"reported\": {...}} with a JSON object");
            goto out;
        }
        if (fm_json_too_deep(patch, FM_JSON_DEPTH_MAX)) {
            shadow_reject(r, m, dev, "invalid_request",
                          "reported: nested more than 16 levels deep (objects and arrays)");
            goto out;
        }
        if (fm_shadow_merge(rep, patch) != 0) {
            shadow_reject(r, m, dev, "internal", "out of memory");
            goto out;
        }
        char *d_text = json_dumps(des, JSON_COMPACT | JSON_SORT_KEYS);
        char *r_text = json_dumps(rep, JSON_COMPACT | JSON_SORT_KEYS);
        fm_errbuf err;
        int rc = FM_ENOMEM;
        if (d_text && r_text) {
            if (strlen(d_text) + strlen(r_text) > FM_SHADOW_MAX_BYTES) {
                rc = FM_ERANGE;
            } else {
                /* Conditional on the version read above: the registry
                 * thread is the only writer of reported state, but the CLI
                 * may have changed desired meanwhile. */
                rc = fm_store_shadow_put(r->store, dev, d_text, r_text, sh.version, &sh.version,
                                         0, &err);
            }
        }
        fm_free(d_text);
        fm_free(r_text);
        if (rc == FM_ERANGE) {
            shadow_reject(r, m, dev, "too_large", "the shadow document would exceed 8192 bytes");
            goto out;
        }
        if (rc == FM_EBUSY) {
            shadow_reject(r, m, dev, "conflict", "the shadow changed meanwhile, retry");
            goto out;
        }
        if (rc == FM_ENOTFOUND) {
            shadow_reject(r, m, dev, "unknown_device", "device is not registered");
            goto out;
        }
        if (rc) {
            shadow_reject(r, m, dev, "unavailable", "could not store the shadow, retry later");
            goto out;
        }
        sh.updated_ms = fm_wall_ms();
    }
    shadow_reply(r, m, dev, "shadow/document", shadow_document(&sh, des, rep));
    if (update)
        registry__push_delta(r, dev);
out:
    json_decref(doc);
    json_decref(des);
    json_decref(rep);
    fm_shadow_clear(&sh);
}

void registry__presence_flush(fm_registry *r)
{
    if (r->npresence == 0)
        return;
    int rc = fm_store_presence_set(r->store, r->cfg.node_id, r->presence, r->npresence);
    if (rc)
        fm_logkv(FM_LOG_WARN, "registry", "cannot record device presence", "error",
                 fm_strerror(rc), NULL);
    r->npresence = 0;
}

/* A connect or disconnect reported by the broker plugin. Reports are
 * batched: a broker restart brings thousands of reconnects at once, and
 * one transaction per report would be one fsync each. The plugin names its
 * start ("boot"): the first report from a new boot means the broker
 * restarted and lost every session, so everyone still marked online is
 * set offline before this report is applied. */
static void handle_presence(fm_registry *r, const regmsg *m)
{
    json_t *doc = json_loadb(m->payload, m->len, 0, NULL);
    const char *dev = json_string_value(json_object_get(doc, "device"));
    const char *boot = json_string_value(json_object_get(doc, "boot"));
    json_t *online = json_object_get(doc, "online");
    json_int_t at = json_integer_value(json_object_get(doc, "at_ms"));
    if (!dev || !fm_device_id_valid(dev) || !json_is_boolean(online) || at <= 0 || !boot ||
        strcmp(m->topic + strlen(FM_PRESENCE_ROOT), dev) != 0) {
        fm_logf(FM_LOG_WARN, "registry", "ignoring a malformed presence report");
        json_decref(doc);
        return;
    }
    atomic_fetch_add(&fm_metrics_get()->presence_events, 1);
    if (strcmp(boot, r->presence_boot) != 0) {
        if (r->presence_boot[0]) {
            registry__presence_flush(r);
            fm_store_presence_reset(r->store, r->cfg.node_id, at);
        }
        snprintf(r->presence_boot, sizeof r->presence_boot, "%s", boot);
    }
    if (r->npresence == REGISTRY_PRESENCE_BATCH)
        registry__presence_flush(r);
    size_t i = r->npresence++;
    snprintf(r->presence_ids[i], sizeof r->presence_ids[i], "%s", dev);
    r->presence[i] = (fm_presence_update){
        .device_id = r->presence_ids[i], .online = json_is_true(online), .at_ms = at};
    json_decref(doc);
}

void registry__handle(fm_registry *r, const regmsg *m)
{
    const char *t = m->topic;
    size_t n = strlen(t);
    if (strncmp(t, FM_PRESENCE_ROOT, strlen(FM_PRESENCE_ROOT)) == 0)
        handle_presence(r, m);
    else if (strncmp(t, "fleet/provisioning/", 19) == 0)
        handle_provision(r, m);
    else if (n > 12 && strcmp(t + n - 12, "/cert/rotate") == 0)
        handle_rotate(r, m);
    else if (n > 14 && strcmp(t + n - 14, "/shadow/update") == 0)
        handle_shadow(r, m, 1);
    else if (n > 11 && strcmp(t + n - 11, "/shadow/get") == 0)
        handle_shadow(r, m, 0);
}
