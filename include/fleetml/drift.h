/*
 * Drift of live features against a version's training baseline
 * (docs/model.md, "Drift"): the population stability index (PSI) over
 * FM_DRIFT_BINS quantile bins of each feature.
 */
#ifndef FLEETML_DRIFT_H
#define FLEETML_DRIFT_H

#include "fleetml/model.h"

#include <stdint.h>

struct json_t;

/* The baseline of training rows x (rows x fm_feature_count(), row-major):
 * per feature, FM_DRIFT_BINS - 1 quantile edges and the fraction of rows
 * in each bin (bins as fm_model_bin draws them), as the manifest's
 * "feature_baseline" object. NULL when rows == 0 or memory ran out. */
struct json_t *fm_drift_baseline_json(const float *x, size_t rows);

/* Live feature counts of one tenant, one model version, one UTC day. */
typedef struct fm_drift_counts {
    char tenant[65];
    char model[128];   /* name@version */
    int64_t day;       /* days since 1970-01-01 (UTC) */
    uint64_t n;        /* measurements counted */
    uint64_t counts[FM_FEATURES_MAX][FM_DRIFT_BINS];
} fm_drift_counts;

/* PSI of every feature of c against model m's baseline into psi
 * (fm_feature_count() values); returns the largest and its feature index
 * in *worst. m must have a baseline. */
double fm_drift_psi_all(const fm_model *m, const fm_drift_counts *c, double *psi, size_t *worst);

/* PSI of live bin counts (n in all) against expected fractions:
 * sum over bins of (a - e) * ln(a / e), with fractions floored at 1e-4 so
 * an empty bin counts without dividing by zero. 0 when n == 0. */
double fm_drift_psi(const double expected[FM_DRIFT_BINS], const uint64_t counts[FM_DRIFT_BINS],
                    uint64_t n);

#endif
