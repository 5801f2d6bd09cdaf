/*
 * The model registry and deployment (docs/model.md, "Registry and
 * deployment").
 *
 * A model name has versions; a version is an XGBoost model file (JSON or
 * UBJSON) plus its manifest (fleetml/model.h). Upload validates everything
 * (the features this build computes, the outputs against the booster, finite
 * answers on realistic measurements), stores the version as `pending` in the
 * catalogue with its file, and copies both into the lake under
 * models/<name>/<version>/. A data scientist or admin approves or rejects
 * it. Per tenant, the alias `production` of the served model family points
 * at an approved version, and `canary` (with a share of devices, chosen by
 * a stable hash of the device id) at another, and `shadow` at a version
 * that scores every measurement beside the live one (stored, never sent);
 * moving an alias is a hot swap
 * on every node (fm_serving): measurements in flight finish on the old
 * version, new ones use the new one, and nothing waits for a model to load.
 */
#ifndef FLEETML_MODELREG_H
#define FLEETML_MODELREG_H

#include "fleetml/config.h"
#include "fleetml/model.h"
#include "fleetml/store.h"
#include "fleetml/drift.h"

#include <jansson.h>
#include <stdatomic.h>
#include <stdbool.h>

#define FM_ALIAS_PRODUCTION "production"
#define FM_ALIAS_CANARY "canary"
#define FM_ALIAS_SHADOW "shadow"
/* Largest model file accepted. */
#define FM_MODEL_FILE_MAX (64u * 1024 * 1024)

/* [a-z0-9][a-z0-9_-]{0,63} */
bool fm_modelreg_name_valid(const char *s);
/* [A-Za-z0-9][A-Za-z0-9._-]{0,31} */
bool fm_modelreg_version_valid(const char *s);
/* "production", "canary" or "shadow" */
bool fm_modelreg_alias_valid(const char *s);

typedef struct fm_model_upload {
    const char *name;         /* must equal the manifest's name */
    const char *manifest;     /* manifest.json text */
    size_t manifest_len;
    const void *file;         /* the XGBoost model file */
    size_t file_len;
    const char *owner_tenant; /* "" for the platform */
    const char *actor;        /* for created_by */
    int64_t now_ms;
} fm_model_upload;

/* Validates an upload and registers it as a pending version (the version
 * is the manifest's), then copies manifest and model file into the lake
 * (models/<name>/<version>/). Returns 0 with *out filled (manifest not
 * kept), FM_EINVAL (bad name, manifest or size) / FM_EMODEL (the model
 * file is unusable) with err saying why, FM_EEXIST (that version exists),
 * or a store/lake error. Nothing is registered on failure. */
int fm_modelreg_push(fm_store *st, const fm_config *cfg, const fm_model_upload *u,
                     fm_model_rec *out, fm_errbuf *err);

/* ---- training from the lake ------------------------------------------------------ */

typedef struct fm_lake_train_opts {
    const char *name;         /* the served family (the bundled model's name) */
    const char *version;      /* of the new version */
    const char *tenant;       /* NULL: every tenant's data */
    int64_t from_ms, to_ms;   /* received_at window, 0: open */
    const char *owner_tenant; /* "" for the platform */
    const char *actor;
    int64_t job_id;           /* the API training job, 0 from the command line */
    void (*progress)(void *ud, const char *phase, int percent); /* may be NULL */
    void *progress_ud;
} fm_lake_train_opts;

typedef struct fm_lake_train_report {
    size_t raw_objects, label_objects, raw_rows, labelled, train_rows, val_rows, devices;
    int best_round;
    double mae[3], rmse[3];           /* the new version, validation rows */
    double prod_mae[3], prod_rmse[3]; /* production on the same rows */
    double const_mae[3];              /* the training mean as a predictor */
    char prod_ref[128];
    fm_model_rec version;             /* the registered (pending) version */
} fm_lake_train_report;

/* Trains a version of the served family from the lake: the raw/
 * measurements (of tenant, in the window) that have a label with every
 * output (the newest correction of each), features by the serving code,
 * split by device (20 % of devices, by stable hash, validate), XGBoost with
 * early stopping on the validation RMSE (at most 300 rounds, patience 20),
 * then MAE/RMSE per output next to the production version's (the tenant's,
 * else the bundled model) and a constant predictor's on the same rows,
 * overall and per tenant (manifest validation.per_tenant). The
 * version is registered pending (fm_modelreg_push) with a manifest naming
 * its dataset (objects, labels, their SHA-256), its metrics and a drift
 * baseline. Returns 0 with *rep, FM_EINVAL (too few labelled measurements,
 * bad version; err says why), FM_EUNAVAIL (lake not readable), or another
 * error; nothing is registered on failure. */
int fm_model_train_lake(const fm_config *cfg, fm_store *st, const fm_lake_train_opts *o,
                        fm_lake_train_report *rep, fm_errbuf *err);

/* ---- MLflow model directories ----------------------------------------------------- */

/* What fleetml needs from an MLflow model's `MLmodel` file (YAML): the
 * xgboost flavour's model file and the signature's input column names. */
typedef struct fm_mlflow_model {
    char data[256];       /* flavors.xgboost.data: the model file, relative */
    char run_id[64];      /* "" when absent */
    char model_uuid[64];  /* "" when absent */
    size_t ninputs;       /* signature inputs (0: no signature) */
    char inputs[FM_FEATURES_MAX][64];
} fm_mlflow_model;

/* Reads MLmodel text (len bytes) with libyaml. Returns 0 with *out, or
 * FM_EINVAL with err naming what is missing or wrong (no xgboost flavour,
 * a data path that leaves the directory, a signature that is not a list of
 * named columns, more than FM_FEATURES_MAX of them). */
int fm_mlflow_parse(const char *text, size_t len, fm_mlflow_model *out, fm_errbuf *err);

/* Joins an MLflow model's MLmodel to a fleetml manifest: the signature's
 * columns (when there is one) must be the manifest's features in order, and
 * the manifest's training section gets {"mlflow": {run_id, model_uuid}}.
 * *manifest (fm_malloc'd text, *mlen bytes) is replaced by the new text.
 * Returns 0, FM_EINVAL with err set, or FM_ENOMEM. */
int fm_mlflow_join(const char *mlmodel, size_t len, char **manifest, size_t *mlen,
                   fm_errbuf *err);

/* ---- serving --------------------------------------------------------------- */

/* What the pipeline scores with: an immutable table built by the deployer
 * (slot 0 is the bundled model from model.dir; the others are registered
 * versions), handed to the pipeline, which picks it up between batches. */
typedef struct fm_serving_slot {
    fm_model *model;    /* borrowed: owned by the deployer's cache or the pipeline */
    char ref[128];      /* "name@version" */
} fm_serving_slot;

typedef struct fm_serving_tenant {
    char tenant[65];
    size_t production;  /* slot */
    size_t canary;      /* slot, when canary_pct > 0 */
    int canary_pct;     /* 0..100 */
    size_t shadow;      /* slot scoring beside the live one, or FM_SERVING_NONE */
} fm_serving_tenant;

#define FM_SERVING_NONE ((size_t)-1)

typedef struct fm_serving {
    uint64_t generation;
    size_t nslots, ntenants;
    fm_serving_slot *slots;
    fm_serving_tenant *tenants;
} fm_serving;

/* The slot that scores a device of tenant: the tenant's canary for the
 * devices whose stable hash falls in its share, else its production
 * version, else slot 0. */
size_t fm_serving_pick(const fm_serving *s, const char *tenant, const char *device_id);
/* The shadow slot of tenant's devices: a version scoring every measurement
 * beside the live one, its answer stored but never sent; FM_SERVING_NONE
 * when the tenant has none. */
size_t fm_serving_shadow(const fm_serving *s, const char *tenant);
/* Frees the table (never the models). NULL is ignored. */
void fm_serving_free(fm_serving *s);
/* The stable 0..99 bucket of a device id for canary shares. */
int fm_serving_bucket(const char *device_id);

/* Where the deployer delivers tables, and learns which one is in use. */
typedef struct fm_serving_sink {
    /* Takes ownership of s (called on the deployer thread). */
    void (*publish)(void *ud, fm_serving *s);
    /* The generation of the table the pipeline scores with now. */
    uint64_t (*in_use)(void *ud);
    /* Live feature counts since the last call (fm_pipeline_drift_take);
     * NULL: no drift monitoring. */
    size_t (*take_drift)(void *ud, struct fm_drift_counts **out);
    void *ud;
} fm_serving_sink;

typedef struct fm_deployer fm_deployer;

/* Starts the deployer thread: it also adds the pipeline's live feature
 * counts to the store every 10 s and checks today's drift of each tenant
 * against the serving versions' baselines (docs/model.md, "Drift"): past
 * model.drift_psi_pct on any feature with model.drift_min_count
 * measurements, it raises an alert once per tenant, version and day (a log
 * line, an audit entry `drift.alert`, fleetml_drift_alerts_total). And it
 * follows the store's deployment log
 * (deploy_seq, every 500 ms, so an alias moved on any node reaches this
 * one), loads the versions the aliases of family name point at (from the
 * catalogue), and publishes a new table. base (slot 0) stays owned by the
 * caller. Returns 0 and *out, or an FM_E* code with err set. */
int fm_deployer_start(const fm_config *cfg, const char *family, fm_model *base,
                      const char *base_ref, const fm_serving_sink *sink, fm_deployer **out,
                      fm_errbuf *err);
/* Checks the log now instead of at the next tick. */
void fm_deployer_wake(fm_deployer *d);
/* Stops the thread (no table is published after it returns); the loaded
 * models stay, for the pipeline to finish with. NULL is ignored. */
void fm_deployer_halt(fm_deployer *d);
/* Halts the deployer if needed and frees it and its models (call after the
 * pipeline stopped scoring). NULL is ignored. */
void fm_deployer_stop(fm_deployer *d);

/* "pending", "approved" or "rejected" (enum fm_model_status); static. */
const char *fm_model_status_name(int status);
/* A registered version as the API (schema ModelVersion) and `fleetml model
 * versions --json` show it; the manifest only when with_manifest. New
 * reference; NULL when out of memory. */
json_t *fm_model_version_json(const fm_model_rec *v, bool with_manifest);
/* A tenant's alias (schema ModelAlias): tenant, alias, version, updated_by,
 * updated_at, and share_pct for a canary. New reference. */
json_t *fm_model_alias_json(const fm_model_alias *a);

#endif
