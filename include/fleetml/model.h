/*
 * Model subsystem: feature extraction (the one definition of the features,
 * shared by serving, `fleetml features` and training), the XGBoost runtime
 * (C API, in-place prediction from a dense float matrix; no per-request
 * DMatrix) and synthetic training.
 *
 * A model lives in a directory (e.g. models/viscosity/) holding
 *   manifest.json  name, version, features (names, in order), outputs
 *                  (name, unit, plausible range), training description,
 *                  holdout metrics
 *   model.json     the XGBoost booster (multi-output regression)
 */
#ifndef FLEETML_MODEL_H
#define FLEETML_MODEL_H

#include "fleetml/core.h"
#include "fleetml/measurement.h"

#define FM_FEATURES_MAX 32
#define FM_OUTPUTS_MAX 8
/* Quantile bins of a version's training features (drift baseline). */
#define FM_DRIFT_BINS 10

/* Number of features produced by fm_features_extract (fixed by the code). */
size_t fm_feature_count(void);
/* Name of feature i (static string), NULL when i is out of range. */
const char *fm_feature_name(size_t i);

/* Computes the feature vector of a validated measurement into out
 * (fm_feature_count() floats). Returns 0, or FM_ERANGE with e->code
 * "out_of_range" when the sweep cannot be used by the model (e.g. it does
 * not cover the needed shear-rate range or the signal is implausible). */
int fm_features_extract(const fm_measurement *m, float *out, fm_verr *e);

typedef struct fm_model fm_model;

typedef struct fm_model_output {
    char name[48];
    char unit[16];
    double min, max; /* plausible range of the output */
} fm_model_output;

/* Loads manifest.json + model.json from dir. Checks that the manifest's
 * feature list equals fm_feature_name() order. Returns 0 and *out (free with
 * fm_model_free), or FM_ENOTFOUND / FM_EINVAL / FM_EMODEL with err set. */
int fm_model_load(const char *dir, fm_model **out, fm_errbuf *err);
void fm_model_free(fm_model *m);
/* The same from memory: the manifest text and the XGBoost model file
 * (JSON or UBJSON) as uploaded. Besides the manifest checks, the model
 * must take fm_feature_count() features, give as many outputs as the
 * manifest lists, and answer finite numbers on an all-missing row and on
 * realistic measurements. 0 and *out, or FM_EINVAL (manifest) / FM_EMODEL
 * (model file) / FM_ENOMEM with err set. Nothing is kept of the buffers. */
int fm_model_load_mem(const char *manifest, size_t mlen, const void *file, size_t flen,
                      fm_model **out, fm_errbuf *err);
/* Writes rows realistic feature vectors (the simulator's measurements,
 * fixed seed: the same rows every time) into x (rows * fm_feature_count()
 * floats). 0 or FM_ENOMEM / FM_EMODEL with err set. */
int fm_model_probe_rows(float *x, size_t rows, fm_errbuf *err);

const char *fm_model_name(const fm_model *m);
const char *fm_model_version(const fm_model *m);
size_t fm_model_output_count(const fm_model *m);
const fm_model_output *fm_model_output_at(const fm_model *m, size_t i);

/* Predicts `rows` feature vectors (row-major, rows * fm_feature_count()
 * floats) into out (rows * fm_model_output_count() floats). Not
 * thread-safe for the same model: one caller at a time. Returns 0 or
 * FM_EMODEL with err set. */
int fm_model_predict(fm_model *m, const float *features, size_t rows, float *out,
                     fm_errbuf *err);

/* The drift baseline of the manifest ("feature_baseline": {"edges":
 * {feature: [FM_DRIFT_BINS - 1 increasing numbers]}, "fractions": {feature:
 * [FM_DRIFT_BINS numbers summing to 1]}}, every feature): false when the
 * version has none. */
bool fm_model_has_baseline(const fm_model *m);
/* The bin (0..FM_DRIFT_BINS-1) of value for feature f; a missing value
 * (NaN) is bin 0. Only with a baseline. */
int fm_model_bin(const fm_model *m, size_t f, float value);
/* The training fraction of bin b of feature f. Only with a baseline. */
double fm_model_baseline_fraction(const fm_model *m, size_t f, int b);

/* Each feature's contribution to each output for one feature vector
 * (XGBoost's exact TreeSHAP): out receives fm_model_output_count() rows of
 * fm_feature_count() + 1 floats, the last of each row being the bias; each
 * row sums to that output's prediction. Off the reply path (it builds a
 * DMatrix). Not thread-safe for the same model. Returns 0 or FM_EMODEL with
 * err set. */
int fm_model_contributions(fm_model *m, const float *features, float *out, fm_errbuf *err);

/* Trains a model from synthetic viscometer data (fixed seed => same model
 * bytes) and writes manifest.json + model.json into out_dir. n_train rows
 * for training and n_holdout for holdout metrics. Returns 0 or an FM_E*
 * code with err set. */
int fm_model_train_synthetic(const char *out_dir, uint64_t seed, size_t n_train,
                             size_t n_holdout, fm_errbuf *err);

#endif
