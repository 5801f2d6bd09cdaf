/*
 * Feature extraction for viscosity.sweep.v1 measurements: the one
 * definition shared by serving, `fleetml features` and training. The exact
 * formulas are written out in docs/model.md; changing any of them (or the
 * order of names) invalidates every trained model, which fm_model_load
 * detects through the feature list in the manifest.
 */
#include "fleetml/model.h"
#include "fleetml/viscometer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Cone constant: tau = M * 3 / (2 pi R^3); with M in uN*m and tau in mPa
 * that is M * 1e-6 * 3 / (2 pi R^3) * 1e3. */
#define TORQUE_TO_MPA (3.0 / (2.0 * M_PI * FM_VISC_CONE_RADIUS_M * FM_VISC_CONE_RADIUS_M * \
                              FM_VISC_CONE_RADIUS_M) * 1e-3)

/* Viscosity is normalised to the reference temperature with the same
 * -2.5 %/degC coefficient the domain literature gives; the model then only
 * has to learn the residual. */
#define TEMP_COEF 0.025
#define TEMP_REF 37.0

/* The sweep must span these rates: the outputs are defined at 1 and 300 1/s
 * and the model is never asked to extrapolate. A relative slack of 1e-6
 * absorbs set points reported as e.g. 0.9999999. */
#define NEED_LO 1.0
#define NEED_HI 300.0
#define RATE_SLACK 1e-6
#define MIN_DISTINCT_RATES 4

/* Apparent viscosities outside this band are not blood (an empty or
 * dry cell reads near zero, a clot or a jammed cone reads huge). */
#define VISC_MIN_MPAS 0.5
#define VISC_MAX_MPAS 1000.0

enum {
    F_TEMP,
    F_LV1,
    F_LV3,
    F_LV10,
    F_LV30,
    F_LV100,
    F_LV300,
    F_LRATIO,
    F_PL_SLOPE,
    F_PL_LOGK,
    F_PL_RMSE,
    F_CASSON_VISC,
    F_CASSON_SQRT_YIELD,
    F_NOISE,
    F_COUNT
};

static const char *const names[F_COUNT] = {
    [F_TEMP] = "temperature_c",
    [F_LV1] = "log_visc_1_37c",
    [F_LV3] = "log_visc_3_37c",
    [F_LV10] = "log_visc_10_37c",
    [F_LV30] = "log_visc_30_37c",
    [F_LV100] = "log_visc_100_37c",
    [F_LV300] = "log_visc_300_37c",
    [F_LRATIO] = "log_ratio_1_300",
    [F_PL_SLOPE] = "powerlaw_slope",
    [F_PL_LOGK] = "powerlaw_log_k",
    [F_PL_RMSE] = "powerlaw_rmse",
    [F_CASSON_VISC] = "casson_visc_mpas",
    [F_CASSON_SQRT_YIELD] = "casson_sqrt_yield",
    [F_NOISE] = "noise_rel",
};

static const double ref_rates[] = {1, 3, 10, 30, 100, 300};
_Static_assert(sizeof ref_rates / sizeof ref_rates[0] == F_LV300 - F_LV1 + 1,
               "one log_visc feature per reference rate");

size_t fm_feature_count(void) { return F_COUNT; }

const char *fm_feature_name(size_t i) { return i < F_COUNT ? names[i] : NULL; }

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Sorts v[0..n) ascending. Steps hold 10-20 steady samples in practice,
 * where an insertion sort beats quickselect and one sort gives both the
 * median and the MAD (mad_sorted); longer arrays (a step may carry up to
 * FM_MEAS_MAX_SAMPLES) go to qsort so no input costs quadratic time. */
static void sort_doubles(double *v, size_t n)
{
    if (n > 32) {
        qsort(v, n, sizeof *v, cmp_double);
        return;
    }
    for (size_t i = 1; i < n; i++) {
        double x = v[i];
        size_t j = i;
        for (; j > 0 && v[j - 1] > x; j--)
            v[j] = v[j - 1];
        v[j] = x;
    }
}

/* Median of sorted v[0..n) (n >= 1). */
static double sorted_median(const double *v, size_t n)
{
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Median of v[0..n) (n >= 1), the same value sorting gives; reorders v. */
static double median(double *v, size_t n)
{
    sort_doubles(v, n);
    return sorted_median(v, n);
}

/* Median of |v[i] - med| for sorted v[0..n) and its median med, without a
 * second sort: the deviations of v[0..p) (all <= med) grow from p - 1 down
 * to 0 and those of v[p..n) (all >= med) grow from p up, so merging the two
 * runs meets the deviations in ascending order. Equal to sorting the
 * deviations, value for value (each is the same fabs(v[i] - med)). */
static double mad_sorted(const double *v, size_t n, double med)
{
    size_t p = (n + 1) / 2, lo = p, hi = p, k = n / 2;
    double prev = 0.0, cur = 0.0;
    for (size_t r = 0; r <= k; r++) {
        prev = cur;
        double dl = lo > 0 ? fabs(v[lo - 1] - med) : INFINITY;
        double dh = hi < n ? fabs(v[hi] - med) : INFINITY;
        if (lo > 0 && (hi >= n || dl <= dh)) {
            cur = dl;
            lo--;
        } else {
            cur = dh;
            hi++;
        }
    }
    return n % 2 ? cur : 0.5 * (prev + cur);
}

/* One usable point of the flow curve. */
struct point {
    double g;     /* shear rate, 1/s */
    double lg;    /* ln g */
    double leta;  /* ln apparent viscosity (mPa*s) at 37 degC */
    double noise; /* robust relative noise of the steady part */
    double w;     /* how many steps were merged into this point */
};

static int cmp_point(const void *a, const void *b)
{
    const struct point *p = a, *q = b;
    return (p->g > q->g) - (p->g < q->g);
}

/* Steady-state torque and relative noise of one step. The first half of a
 * step holds the start-up transient (overshoot while the flow structure
 * settles), so only the last half is used; the median shrugs off spikes and
 * the MAD (scaled to a Gaussian sigma) measures the noise the same way. */
static void step_steady(const fm_sweep_step *st, double *torque, double *noise)
{
    double buf[FM_MEAS_MAX_SAMPLES];
    size_t half = (st->n_samples + 1) / 2;
    size_t first = st->n_samples - half;
    memcpy(buf, st->samples + first, half * sizeof *buf);
    double med = median(buf, half);
    double mad = mad_sorted(buf, half, med) * 1.4826;
    *torque = med;
    *noise = med != 0.0 ? mad / fabs(med) : 0.0;
}

/* Log-log interpolation of the flow curve at rate r; pts is sorted and
 * covers r (checked by the caller). */
static double interp(const struct point *pts, size_t n, double r)
{
    double lr = log(r);
    if (lr <= pts[0].lg)
        return pts[0].leta;
    for (size_t i = 1; i < n; i++) {
        if (lr <= pts[i].lg) {
            double f = (lr - pts[i - 1].lg) / (pts[i].lg - pts[i - 1].lg);
            return pts[i - 1].leta + f * (pts[i].leta - pts[i - 1].leta);
        }
    }
    return pts[n - 1].leta;
}

/* Ordinary least squares y = a + b x; n >= 2 distinct x guaranteed. */
static void ols(const double *x, const double *y, size_t n, double *a, double *b)
{
    double mx = 0, my = 0;
    for (size_t i = 0; i < n; i++) {
        mx += x[i];
        my += y[i];
    }
    mx /= (double)n;
    my /= (double)n;
    double sxy = 0, sxx = 0;
    for (size_t i = 0; i < n; i++) {
        sxy += (x[i] - mx) * (y[i] - my);
        sxx += (x[i] - mx) * (x[i] - mx);
    }
    *b = sxx > 0 ? sxy / sxx : 0.0;
    *a = my - *b * mx;
}

int fm_features_extract(const fm_measurement *m, float *out, fm_verr *e)
{
    struct point pts[FM_MEAS_MAX_STEPS];
    size_t n = 0;

    if (!isfinite(m->temperature_c) || m->temperature_c < FM_MEAS_TEMP_MIN_C ||
        m->temperature_c > FM_MEAS_TEMP_MAX_C) {
        fm_verrf(e, FM_VERR_OUT_OF_RANGE, "temperature_c: %g degC is outside %g..%g",
                 m->temperature_c, FM_MEAS_TEMP_MIN_C, FM_MEAS_TEMP_MAX_C);
        return FM_ERANGE;
    }
    if (m->n_steps < 2 || m->n_steps > FM_MEAS_MAX_STEPS) {
        fm_verrf(e, FM_VERR_OUT_OF_RANGE, "sweep: %zu steps, expected %d..%d", m->n_steps,
                 FM_MEAS_MIN_STEPS, FM_MEAS_MAX_STEPS);
        return FM_ERANGE;
    }
    double tcorr = TEMP_COEF * (m->temperature_c - TEMP_REF);
    for (size_t i = 0; i < m->n_steps; i++) {
        const fm_sweep_step *st = &m->steps[i];
        double g = st->shear_rate_s;
        if (!(g > 0.0) || !isfinite(g) || st->n_samples < 1 ||
            st->n_samples > FM_MEAS_MAX_SAMPLES) {
            fm_verrf(e, FM_VERR_OUT_OF_RANGE, "sweep[%zu]: unusable step (shear rate %g 1/s, %zu samples)",
                     i, g, st->n_samples);
            return FM_ERANGE;
        }
        double torque, noise;
        step_steady(st, &torque, &noise);
        if (!(torque > 0.0)) {
            fm_verrf(e, FM_VERR_OUT_OF_RANGE,
                     "sweep[%zu]: steady-state torque %.3g uN*m at %g 1/s is not positive", i,
                     torque, g);
            return FM_ERANGE;
        }
        double eta = torque * TORQUE_TO_MPA / g;
        if (eta < VISC_MIN_MPAS || eta > VISC_MAX_MPAS) {
            fm_verrf(e, FM_VERR_OUT_OF_RANGE,
                     "sweep[%zu]: apparent viscosity %.3g mPa*s at %g 1/s is outside the "
                     "plausible range %g..%g",
                     i, eta, g, VISC_MIN_MPAS, VISC_MAX_MPAS);
            return FM_ERANGE;
        }
        pts[n++] = (struct point){g, log(g), log(eta) + tcorr, noise, 1.0};
    }

    /* Sort by rate and merge repeated set points (a device may revisit a
     * rate, e.g. up-and-down sweeps) by averaging them in log space, so the
     * interpolation sees a strictly increasing abscissa. */
    qsort(pts, n, sizeof pts[0], cmp_point);
    size_t d = 0;
    for (size_t i = 0; i < n; i++) {
        if (d > 0 && pts[i].g == pts[d - 1].g) {
            struct point *p = &pts[d - 1];
            p->leta = (p->leta * p->w + pts[i].leta) / (p->w + 1.0);
            p->noise = p->noise > pts[i].noise ? p->noise : pts[i].noise;
            p->w += 1.0;
        } else {
            pts[d++] = pts[i];
        }
    }
    n = d;
    if (pts[0].g > NEED_LO * (1.0 + RATE_SLACK) || pts[n - 1].g < NEED_HI * (1.0 - RATE_SLACK)) {
        fm_verrf(e, FM_VERR_OUT_OF_RANGE,
                 "sweep: needs shear rates covering %g..%g 1/s, got %g..%g", NEED_LO, NEED_HI,
                 pts[0].g, pts[n - 1].g);
        return FM_ERANGE;
    }
    if (n < MIN_DISTINCT_RATES) {
        fm_verrf(e, FM_VERR_OUT_OF_RANGE, "sweep: needs at least %d distinct shear rates, got %zu",
                 MIN_DISTINCT_RATES, n);
        return FM_ERANGE;
    }

    out[F_TEMP] = (float)m->temperature_c;
    for (size_t i = 0; i < sizeof ref_rates / sizeof ref_rates[0]; i++)
        out[F_LV1 + i] = (float)interp(pts, n, ref_rates[i]);
    out[F_LRATIO] = out[F_LV1] - out[F_LV300];

    /* Power law over the whole sweep: ln eta = ln K + (n - 1) ln g. The
     * residual RMS says how far the curve bends away from a power law,
     * which grows with aggregation. */
    double x[FM_MEAS_MAX_STEPS], y[FM_MEAS_MAX_STEPS], a, b;
    for (size_t i = 0; i < n; i++) {
        x[i] = pts[i].lg;
        y[i] = pts[i].leta;
    }
    ols(x, y, n, &a, &b);
    double ss = 0;
    for (size_t i = 0; i < n; i++) {
        double r = y[i] - (a + b * x[i]);
        ss += r * r;
    }
    out[F_PL_SLOPE] = (float)b;
    out[F_PL_LOGK] = (float)a;
    out[F_PL_RMSE] = (float)sqrt(ss / (double)n);

    /* Casson: sqrt(tau) = sqrt(tau_y) + sqrt(eta_c) sqrt(g), tau in mPa. The
     * slope squared estimates the high-shear (cell-dominated) viscosity;
     * the intercept is kept signed instead of squaring it into a yield
     * stress, so a fit that crosses zero does not fold back. */
    for (size_t i = 0; i < n; i++) {
        x[i] = sqrt(pts[i].g);
        y[i] = sqrt(exp(pts[i].leta) * pts[i].g);
    }
    ols(x, y, n, &a, &b);
    out[F_CASSON_VISC] = (float)(b * b);
    out[F_CASSON_SQRT_YIELD] = (float)a;

    double nz[FM_MEAS_MAX_STEPS];
    for (size_t i = 0; i < n; i++)
        nz[i] = pts[i].noise;
    out[F_NOISE] = (float)median(nz, n);

    for (size_t i = 0; i < F_COUNT; i++) {
        if (!isfinite(out[i])) {
            fm_verrf(e, FM_VERR_OUT_OF_RANGE, "feature %s is not finite", names[i]);
            return FM_ERANGE;
        }
    }
    return 0;
}
