/*
 * Events: what happened in fleetml, as documents rules react to
 * (docs/functions.md, schemas in docs/schemas/events/).
 *
 * Every event is derived from committed data, read back in commit order
 * from the store (the same ordered scans the lake exporter and the live
 * streams use), never from memory on the way in: a crash neither loses one
 * nor invents one. Delivery is at least once; an event's id is stable
 * (the same committed row always gives the same id), so a consumer drops
 * repeats by id.
 *
 *   type                 source (store scan)          id
 *   measurement.stored   records (RAW stream)        measurement.stored:<seq>
 *   result.produced      records (RAW stream)        result.produced:<seq>
 *   label.written        label log (LABELS stream)   label.written:<seq>
 *   device.online        presence changes (rev)      device.online:<rev>
 *   device.offline       presence changes (rev)      device.offline:<rev>
 *   device.revoked       registry event log          device.revoked:<device>
 *   device.provisioned   registry event log          device.provisioned:<seq>
 *   model.deployed       model alias history         model.deployed:<seq>
 *   training.finished    audit log (written with the job's final state) training.finished:<seq>
 *   drift.alert          audit log (the alert's entry) drift.alert:<seq>
 *   lake.object.created  lake object log (written when the export cursor
 *                        settles)                    lake.object.created:<seq>
 *
 * The document (version FM_EVENTS_VERSION):
 *   {"specversion": "fleetml.events/1", "id": ..., "type": ..., "time":
 *    RFC 3339, "tenant": ..., "subject": "devices/<id>[/measurements/<mid>]"
 *    (models/<name>, jobs/<id> or lake/<key> for those events),
 *    "data": {...}}
 */
#ifndef FLEETML_EVENTS_H
#define FLEETML_EVENTS_H

#include "fleetml/store.h"

#include <jansson.h>

#define FM_EVENTS_VERSION "fleetml.events/1"

enum fm_event_type {
    FM_EV_MEASUREMENT_STORED = 0,
    FM_EV_RESULT_PRODUCED,
    FM_EV_LABEL_WRITTEN,
    FM_EV_DEVICE_ONLINE,
    FM_EV_DEVICE_OFFLINE,
    FM_EV_DEVICE_REVOKED,
    FM_EV_DEVICE_PROVISIONED,
    FM_EV_MODEL_DEPLOYED,
    FM_EV_TRAINING_FINISHED,
    FM_EV_DRIFT_ALERT,
    FM_EV_LAKE_OBJECT_CREATED,
    FM_EV__COUNT
};

/* Where events of a type come from; each source is one ordered store scan
 * with its own position (seq, rev or registry event seq). */
enum fm_event_source {
    FM_SRC_RECORDS = 0,
    FM_SRC_LABELS,
    FM_SRC_PRESENCE,
    FM_SRC_REGISTRY,
    FM_SRC_ALIASES,
    FM_SRC_AUDIT,
    FM_SRC_LAKE
};
/* The source's name as the store's rule rewind knows it ("records",
 * "labels", "presence", "registry", "aliases", "audit", "lake"). */
const char *fm_event_source_name(enum fm_event_source s);

/* "result.produced", ... (static); NULL for an unknown type. */
const char *fm_event_type_name(int type);
/* The type named name, or -1. */
int fm_event_type_parse(const char *name);
/* The source a type's events come from. */
enum fm_event_source fm_event_type_source(int type);

/* Builds the event document of a committed record: type is
 * FM_EV_MEASUREMENT_STORED (data: device, measurement_id, received_at,
 * taken_at, measurement) or FM_EV_RESULT_PRODUCED (data: device,
 * measurement_id, received_at, model, status, outputs, and shadow when a
 * shadow version answered too). NULL when out of memory, or for
 * result.produced when the record has no result document. New reference. */
json_t *fm_event_from_record(int type, const fm_record *rec);
/* label.written (data: device, measurement_id, outputs, source,
 * labelled_by). New reference, NULL when out of memory. */
json_t *fm_event_from_label(const fm_label *l);
/* device.online / device.offline from a presence change (data: device,
 * online, changed_at). New reference. */
json_t *fm_event_from_presence(const fm_presence_change *c);
/* device.revoked of a device (data: device, group). New reference. */
json_t *fm_event_from_revocation(const fm_device *d, int64_t at_ms);
/* device.provisioned of a device (data: device, group, serial_number),
 * seq its registry event. New reference. */
json_t *fm_event_from_provisioning(const fm_device *d, int64_t seq, int64_t at_ms);
/* model.deployed of an alias change (data: model, alias, version (null
 * when the alias was removed), share_pct, updated_by). New reference. */
json_t *fm_event_from_alias(const fm_model_alias *a, int64_t seq);
/* training.finished or drift.alert from their audit entry (actions
 * "training.finished" and "drift.alert"; NULL for any other action):
 * data is the entry's details plus the version (training) or model (drift)
 * it names. New reference. */
json_t *fm_event_from_audit(const fm_audit *a);
/* lake.object.created of an object the export published (data: key,
 * area, rows (null when not known)). New reference. */
json_t *fm_event_from_lake_object(const fm_lake_object *o);

#endif
