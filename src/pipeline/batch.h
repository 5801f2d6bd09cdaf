/*
 * One group commit as an object (pipeline-internal). The commit thread
 * runs the phases in order, each a function over the same struct:
 *
 *   batch__init -> batch__admit -> batch__infer -> batch__build_rows
 *     -> batch__commit -> batch__reply -> batch__release
 *
 * Everything a phase needs from outside comes through batch_env (the
 * store, the device lookup, the scorer, the publisher), so each phase can
 * be unit-tested with a fake store and a fake model (tests/unit/
 * test_batch.c).
 *
 * Dedupe is by key: a measurement whose (device, id) is already stored is
 * found by the store's insert-or-ignore at commit time (fm_record.existed),
 * and only then is its stored result read, to answer it byte for byte as
 * the first time. Repeats inside one batch follow the first copy (its
 * "leader") without a second row.
 */
#ifndef FLEETML_PIPELINE_BATCH_H
#define FLEETML_PIPELINE_BATCH_H

#include "fleetml/measurement.h"
#include "fleetml/model.h"
#include "fleetml/modelreg.h"
#include "fleetml/pipeline.h"
#include "fleetml/store.h"

#include <stdbool.h>

/* The message as the pipeline holds it (fm_inmsg is opaque outside). */
struct fm_inmsg {
    struct fm_inmsg *next;
    char device_id[FM_DEVICE_ID_MAX + 1]; /* from the topic fleet/<device>/measurements */
    char *payload;                        /* fm_malloc'd, NUL-terminated after len bytes */
    size_t len;
    char *response_topic; /* fm_malloc'd or NULL (MQTT 5 Response Topic) */
    void *corr;           /* fm_malloc'd or NULL (MQTT 5 Correlation Data) */
    size_t corr_len;
    uint64_t recv_ns;     /* fm_mono_ns() at receipt */
    int64_t recv_ms;      /* wall clock at receipt */
    uint64_t prepared_ns; /* fm_mono_ns() once prepared */
    struct prepared *prep; /* parse and feature results, or NULL */
    fm_reply_fn reply;    /* NULL: reply over MQTT (publish callback) */
    void *reply_ud;
};

/* What a worker computed for one message, owned by the message. */
typedef struct prepared {
    int parse_rc; /* 0, or FM_EINVAL/FM_ENOMEM with verr set */
    int feat_rc;  /* 0, or non-zero with verr set (only when parse_rc == 0) */
    fm_measurement m;
    fm_verr verr;
    float feat[FM_FEATURES_MAX];
} prepared;

/* The models as the batch sees them: a seam for tests. Each measurement is
 * scored by one model slot, chosen per device (its tenant's deployment,
 * its canary bucket); a batch may use several. Slots stay valid for the
 * whole batch. */
typedef struct batch_scorer {
    /* The slot scoring a device (NULL: always slot 0). */
    size_t (*pick)(void *ud, const fm_device *dev);
    /* The slot scoring it in shadow (answer stored, never sent), or
     * FM_SERVING_NONE (NULL: never). */
    size_t (*shadow_pick)(void *ud, const fm_device *dev);
    /* Scores rows x fm_feature_count() features into rows x FM_OUTPUTS_MAX
     * (row stride FM_OUTPUTS_MAX) with the model of slot; payloads[r] is
     * row r's measurement as received (a processor function gets it). A
     * row whose outputs are NaN failed alone (its device is told to retry);
     * a non-zero return fails every row of the batch. */
    int (*predict)(void *ud, size_t slot, const float *feat, const char *const *payloads,
                   size_t rows, float *out, fm_errbuf *err);
    /* The "ok" reply document (fm_result_ok_json); fm_free'd by the batch. */
    char *(*ok_doc)(void *ud, size_t slot, const char *mid, const float *out, int64_t recv_ms);
    /* "name@version" of slot, stored with each row (valid for the batch). */
    const char *(*model_ref)(void *ud, size_t slot);
    void *ud;
} batch_scorer;

typedef struct batch_env {
    fm_store *store;
    /* The device row (a cache in front of the store); 0, FM_ENOTFOUND or
     * another FM_E* code. */
    int (*device_lookup)(void *ud, const char *id, fm_device *out);
    void *device_ud;
    const batch_scorer *scorer;
    fm_publish_fn publish; /* replies of MQTT messages */
    void *publish_ud;
    int max_payload; /* bytes; a larger payload is answered payload_too_large */
} batch_env;

/* Per-message working state. */
typedef struct batch_item {
    fm_inmsg *msg;
    fm_measurement m; /* taken from msg->prep by admit */
    fm_device dev;
    fm_verr verr;
    bool rejected;  /* answered with an error (quarantined when the payload's fault) */
    bool follower;  /* same (device, id) as an earlier item of this batch */
    bool existed;   /* already stored before this batch: answered with stored */
    size_t leader;  /* index of that earlier item */
    size_t row;     /* row in the feature matrix */
    size_t slot;    /* the model slot scoring it */
    size_t shadow;  /* the shadow slot, or FM_SERVING_NONE */
    char *shadow_result; /* the shadow's answer (fm_free), stored only */
    size_t rec;     /* index in recs, when it has a record */
    bool has_rec;
    char *result;   /* reply document (fm_free) */
} batch_item;

typedef struct batch {
    size_t n;
    batch_item *items;
    float *feat, *pred;
    float *spred;         /* shadow outputs (stride FM_OUTPUTS_MAX), when any */
    float *gfeat, *gpred; /* scratch for scoring one slot's rows together */
    size_t *grow;
    const char **rowmsg, **gmsg; /* payload of each row; scratch for one slot's */
    size_t rows;
    size_t *index;  /* open addressing, item index + 1 of each row's (device, id); 0 empty */
    size_t index_mask;
    fm_record *recs;
    size_t nr;
    fm_quarantine *quar;
    size_t nq;
    bool model_ok;  /* inference succeeded (or was not needed) */
    bool committed; /* the commit succeeded (or there was nothing to commit) */
    fm_errbuf commit_err; /* why, when it did not */
    size_t stored;  /* rows newly written by the commit */
} batch;

/* Parse, validate and extract features of msg (CPU only; no store, no
 * model); a no-op when already done. Returns 0, or FM_ENOMEM (msg stays
 * unprepared). */
int batch__prepare(fm_inmsg *msg, int max_payload);

/* Takes ownership of the n messages of list (linked by next). Returns 0,
 * or FM_ENOMEM with the list untouched (the caller drops it). */
int batch__init(batch *b, fm_inmsg *list, size_t n);
/* Device checks, verdicts of preparation, repeats within the batch; fills
 * the feature matrix. */
void batch__admit(batch *b, const batch_env *env);
/* Scores every admitted row in one call. */
void batch__infer(batch *b, const batch_env *env);
/* The reply documents of admitted items, and the rows to commit
 * (measurements with results, quarantined payloads). */
void batch__build_rows(batch *b, const batch_env *env);
/* One durable transaction; marks the items whose key existed. Returns
 * b->committed. */
bool batch__commit(batch *b, const batch_env *env);
/* Publishes every reply (only after the commit decided each one). */
void batch__reply(batch *b, const batch_env *env);
/* Frees the messages and the batch; returns the payload bytes released.
 * A message that was never answered (reply hook) is told so. */
long batch__release(batch *b);

#endif
