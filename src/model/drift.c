/*
 * Drift baselines and the population stability index (fleetml/drift.h).
 */
#include "fleetml/drift.h"

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

json_t *fm_drift_baseline_json(const float *x, size_t rows)
{
    size_t nf = fm_feature_count();
    if (rows == 0)
        return NULL;
    float *col = fm_malloc(rows * sizeof *col);
    json_t *edges = json_object(), *fractions = json_object();
    if (!col || !edges || !fractions) {
        fm_free(col);
        json_decref(edges);
        json_decref(fractions);
        return NULL;
    }
    for (size_t f = 0; f < nf; f++) {
        size_t n = 0;
        for (size_t r = 0; r < rows; r++)
            if (isfinite(x[r * nf + f]))
                col[n++] = x[r * nf + f];
        qsort(col, n, sizeof *col, cmp_float);
        float e[FM_DRIFT_BINS - 1];
        json_t *ej = json_array(), *fj = json_array();
        for (size_t i = 0; i + 1 < FM_DRIFT_BINS; i++) {
            e[i] = n ? col[(size_t)((double)(i + 1) / FM_DRIFT_BINS * (double)(n - 1))] : 0.0f;
            json_array_append_new(ej, json_real(e[i]));
        }
        /* Fractions as fm_model_bin will bin live values (ties go low). */
        uint64_t counts[FM_DRIFT_BINS] = {0};
        for (size_t r = 0; r < rows; r++) {
            float v = x[r * nf + f];
            int b = 0;
            if (isfinite(v))
                while (b < FM_DRIFT_BINS - 1 && v > e[b])
                    b++;
            counts[b]++;
        }
        for (size_t i = 0; i < FM_DRIFT_BINS; i++)
            json_array_append_new(fj, json_real((double)counts[i] / (double)rows));
        json_object_set_new(edges, fm_feature_name(f), ej);
        json_object_set_new(fractions, fm_feature_name(f), fj);
    }
    fm_free(col);
    return json_pack("{s:i,s:o,s:o}", "bins", FM_DRIFT_BINS, "edges", edges, "fractions",
                     fractions);
}

double fm_drift_psi(const double expected[FM_DRIFT_BINS], const uint64_t counts[FM_DRIFT_BINS],
                    uint64_t n)
{
    if (n == 0)
        return 0.0;
    double psi = 0.0;
    for (int i = 0; i < FM_DRIFT_BINS; i++) {
        double a = (double)counts[i] / (double)n, e = expected[i];
        if (a < 1e-4)
            a = 1e-4;
        if (e < 1e-4)
            e = 1e-4;
        psi += (a - e) * log(a / e);
    }
    return psi;
}

double fm_drift_psi_all(const fm_model *m, const fm_drift_counts *c, double *psi, size_t *worst)
{
    double max = 0.0;
    *worst = 0;
    for (size_t f = 0; f < fm_feature_count(); f++) {
        double e[FM_DRIFT_BINS];
        for (int b = 0; b < FM_DRIFT_BINS; b++)
            e[b] = fm_model_baseline_fraction(m, f, b);
        psi[f] = fm_drift_psi(e, c->counts[f], c->n);
        if (psi[f] > max) {
            max = psi[f];
            *worst = f;
        }
    }
    return max;
}
