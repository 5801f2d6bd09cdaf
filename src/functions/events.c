/*
 * Event documents from committed rows (fleetml/events.h). Pure functions of
 * what the store hands over: the same row always gives the same document
 * and id, which is what makes redelivery harmless to a consumer that drops
 * repeats by id.
 */
#include "fleetml/events.h"
#include "fleetml/json.h"

#include <stdio.h>
#include <string.h>

static const struct {
    const char *name;
    enum fm_event_source source;
} types[FM_EV__COUNT] = {
    [FM_EV_MEASUREMENT_STORED] = {"measurement.stored", FM_SRC_RECORDS},
    [FM_EV_RESULT_PRODUCED] = {"result.produced", FM_SRC_RECORDS},
    [FM_EV_LABEL_WRITTEN] = {"label.written", FM_SRC_LABELS},
    [FM_EV_DEVICE_ONLINE] = {"device.online", FM_SRC_PRESENCE},
    [FM_EV_DEVICE_OFFLINE] = {"device.offline", FM_SRC_PRESENCE},
    [FM_EV_DEVICE_REVOKED] = {"device.revoked", FM_SRC_REGISTRY},
    [FM_EV_DEVICE_PROVISIONED] = {"device.provisioned", FM_SRC_REGISTRY},
    [FM_EV_MODEL_DEPLOYED] = {"model.deployed", FM_SRC_ALIASES},
    [FM_EV_TRAINING_FINISHED] = {"training.finished", FM_SRC_AUDIT},
    [FM_EV_DRIFT_ALERT] = {"drift.alert", FM_SRC_AUDIT},
    [FM_EV_LAKE_OBJECT_CREATED] = {"lake.object.created", FM_SRC_LAKE},
};

const char *fm_event_source_name(enum fm_event_source s)
{
    static const char *const names[] = {"records", "labels", "presence", "registry", "aliases",
                                        "audit", "lake"};
    return (unsigned)s < sizeof names / sizeof names[0] ? names[s] : "";
}

const char *fm_event_type_name(int type)
{
    return type >= 0 && type < FM_EV__COUNT ? types[type].name : NULL;
}

int fm_event_type_parse(const char *name)
{
    for (int i = 0; name && i < FM_EV__COUNT; i++)
        if (strcmp(types[i].name, name) == 0)
            return i;
    return -1;
}

enum fm_event_source fm_event_type_source(int type)
{
    return type >= 0 && type < FM_EV__COUNT ? types[type].source : FM_SRC_RECORDS;
}

/* A stored JSON text as a value; null when it does not parse (it always
 * does: only validated documents are stored). */
static json_t *doc(const char *text, size_t len)
{
    json_t *j = text ? json_loadb(text, len, 0, NULL) : NULL;
    return j ? j : json_null();
}

/* The envelope around data (taken). id_key is what follows "<type>:". */
static json_t *envelope(int type, const char *id_key, int64_t at_ms, const char *tenant,
                        const char *subject, json_t *data)
{
    char id[160];
    snprintf(id, sizeof id, "%s:%s", types[type].name, id_key);
    if (!data)
        return NULL;
    return json_pack("{s:s,s:s,s:s,s:o,s:o,s:o,s:o}", "specversion", FM_EVENTS_VERSION, "id", id,
                     "type", types[type].name, "time", fm_json_time(at_ms), "tenant",
                     fm_json_str(tenant), "subject", fm_json_str(subject), "data", data);
}

json_t *fm_event_from_record(int type, const fm_record *rec)
{
    char key[32], subject[160];
    snprintf(key, sizeof key, "%lld", (long long)rec->seq);
    snprintf(subject, sizeof subject, "devices/%s/measurements/%s", rec->device_id,
             rec->measurement_id);
    if (type == FM_EV_MEASUREMENT_STORED) {
        json_t *data = json_pack("{s:s,s:s,s:o,s:o,s:o}", "device", rec->device_id,
                                 "measurement_id", rec->measurement_id, "received_at",
                                 fm_json_time(rec->received_ms), "taken_at",
                                 fm_json_time(rec->taken_ms), "measurement",
                                 doc(rec->payload, rec->payload_len));
        return envelope(type, key, rec->received_ms, rec->tenant, subject, data);
    }
    if (type != FM_EV_RESULT_PRODUCED || !rec->result_json)
        return NULL;
    json_t *result = doc(rec->result_json, strlen(rec->result_json));
    json_t *outputs = json_object_get(result, "outputs");
    json_t *status = json_object_get(result, "status");
    json_t *data = json_pack("{s:s,s:s,s:o,s:o,s:O,s:O}", "device", rec->device_id,
                             "measurement_id", rec->measurement_id, "received_at",
                             fm_json_time(rec->received_ms), "model", fm_json_str(rec->model),
                             "status", status ? status : json_null(), "outputs",
                             outputs ? outputs : json_object());
    json_decref(result);
    if (data && rec->shadow_json)
        json_object_set_new(data, "shadow", doc(rec->shadow_json, strlen(rec->shadow_json)));
    return envelope(type, key, rec->received_ms, rec->tenant, subject, data);
}

json_t *fm_event_from_label(const fm_label *l)
{
    char key[32], subject[160];
    snprintf(key, sizeof key, "%lld", (long long)l->seq);
    snprintf(subject, sizeof subject, "devices/%s/measurements/%s", l->device_id,
             l->measurement_id);
    json_t *data = json_pack("{s:s,s:s,s:o,s:o,s:o}", "device", l->device_id, "measurement_id",
                             l->measurement_id, "outputs",
                             doc(l->outputs_json, l->outputs_json ? strlen(l->outputs_json) : 0),
                             "source", fm_json_str(l->source), "labelled_by",
                             fm_json_str(l->labelled_by));
    return envelope(FM_EV_LABEL_WRITTEN, key, l->at_ms, l->tenant, subject, data);
}

json_t *fm_event_from_presence(const fm_presence_change *c)
{
    char key[32], subject[96];
    snprintf(key, sizeof key, "%lld", (long long)c->rev);
    snprintf(subject, sizeof subject, "devices/%s", c->device_id);
    json_t *data = json_pack("{s:s,s:b,s:o}", "device", c->device_id, "online", c->online,
                             "changed_at", fm_json_time(c->changed_ms));
    return envelope(c->online ? FM_EV_DEVICE_ONLINE : FM_EV_DEVICE_OFFLINE, key, c->changed_ms,
                    c->tenant, subject, data);
}

json_t *fm_event_from_revocation(const fm_device *d, int64_t at_ms)
{
    char subject[96];
    snprintf(subject, sizeof subject, "devices/%s", d->id);
    json_t *data = json_pack("{s:s,s:s}", "device", d->id, "group", d->device_group);
    /* Revocation is final: one event per device, keyed by the device. */
    return envelope(FM_EV_DEVICE_REVOKED, d->id, at_ms, d->tenant, subject, data);
}

json_t *fm_event_from_provisioning(const fm_device *d, int64_t seq, int64_t at_ms)
{
    char key[32], subject[96];
    snprintf(key, sizeof key, "%lld", (long long)seq);
    snprintf(subject, sizeof subject, "devices/%s", d->id);
    json_t *data = json_pack("{s:s,s:s,s:s}", "device", d->id, "group", d->device_group,
                             "serial_number", d->serial_number);
    return envelope(FM_EV_DEVICE_PROVISIONED, key, at_ms, d->tenant, subject, data);
}

json_t *fm_event_from_alias(const fm_model_alias *a, int64_t seq)
{
    char key[32], subject[160];
    snprintf(key, sizeof key, "%lld", (long long)seq);
    snprintf(subject, sizeof subject, "models/%s/aliases/%s", a->name, a->alias);
    json_t *data = json_pack("{s:s,s:s,s:o,s:i,s:s}", "model", a->name, "alias", a->alias,
                             "version", a->version[0] ? json_string(a->version) : json_null(),
                             "share_pct", a->share_pct, "updated_by", a->updated_by);
    return envelope(FM_EV_MODEL_DEPLOYED, key, a->updated_ms, a->tenant, subject, data);
}

json_t *fm_event_from_audit(const fm_audit *a)
{
    int type = fm_event_type_parse(a->action);
    if (type != FM_EV_TRAINING_FINISHED && type != FM_EV_DRIFT_ALERT)
        return NULL;
    char key[32], subject[200];
    snprintf(key, sizeof key, "%lld", (long long)a->seq);
    json_t *data = a->details_json ? json_loads(a->details_json, 0, NULL) : NULL;
    if (!json_is_object(data)) {
        json_decref(data);
        data = json_object();
    }
    if (type == FM_EV_TRAINING_FINISHED) {
        json_object_set_new(data, "version", fm_json_str(a->target));
        snprintf(subject, sizeof subject, "training-jobs/%lld",
                 (long long)json_integer_value(json_object_get(data, "job")));
    } else {
        json_object_set_new(data, "model", fm_json_str(a->target));
        snprintf(subject, sizeof subject, "models/%s", a->target ? a->target : "");
    }
    return envelope(type, key, a->at_ms, a->tenant, subject, data);
}

json_t *fm_event_from_lake_object(const fm_lake_object *o)
{
    char key[32], subject[600];
    snprintf(key, sizeof key, "%lld", (long long)o->seq);
    snprintf(subject, sizeof subject, "lake/%s", o->key);
    json_t *data = json_pack("{s:s,s:s,s:o}", "key", o->key, "area", o->area, "rows",
                             o->rows >= 0 ? json_integer(o->rows) : json_null());
    return envelope(FM_EV_LAKE_OBJECT_CREATED, key, o->at_ms, o->tenant, subject, data);
}
