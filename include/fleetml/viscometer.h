/*
 * Simulated cone-plate viscometer (see docs/model.md for the physics):
 * draws a blood sample (hematocrit, plasma viscosity, aggregation),
 * computes its true shear-thinning viscosity curve, and produces the raw,
 * noisy torque time series a device would report at each shear-rate step.
 * Used by `fleetml device run`, `fleetml sim` and synthetic training, so the
 * same physics feeds the model and the demo fleet.
 */
#ifndef FLEETML_VISCOMETER_H
#define FLEETML_VISCOMETER_H

#include "fleetml/core.h"
#include <stdint.h>

/* Cone-plate geometry fixed by kind viscosity.sweep.v1: cone radius 24 mm,
 * shear stress tau = 3 M / (2 pi R^3) for torque M. Samples are torque in
 * micronewton-metres (uN*m). */
#define FM_VISC_CONE_RADIUS_M 0.024

/* Ground truth of one simulated sample (normalised to 37 degC). */
typedef struct fm_visc_truth {
    double hematocrit_pct;       /* 20..65 */
    double plasma_mpas;          /* plasma viscosity */
    double viscosity_high_mpas;  /* apparent viscosity at 300 1/s, 37 degC */
    double viscosity_low_mpas;   /* apparent viscosity at 1 1/s, 37 degC */
} fm_visc_truth;

/* Small deterministic PRNG (xoshiro256**-style) so runs are reproducible. */
typedef struct fm_rng {
    uint64_t s[4];
} fm_rng;
void fm_rng_seed(fm_rng *r, uint64_t seed);
uint64_t fm_rng_next(fm_rng *r);
double fm_rng_uniform(fm_rng *r);            /* [0,1) */
double fm_rng_normal(fm_rng *r, double mu, double sigma);

/* True apparent viscosity (mPa*s) at shear rate g (1/s) and temperature t
 * (degC) for a sample with truth parameters. */
double fm_visc_true_viscosity(const fm_visc_truth *t, double shear_rate_s, double temp_c);

/* Draws a random sample's truth (population of hospital patients). */
void fm_visc_draw_truth(fm_rng *r, fm_visc_truth *out);
/* The same population with every hematocrit moved by hct_shift points
 * (clipped to 20..65 %): a drifting patient mix, for drift checks. */
void fm_visc_draw_truth_shifted(fm_rng *r, double hct_shift, fm_visc_truth *out);

/* Produces a viscosity.sweep.v1 measurement JSON document (NUL-terminated,
 * caller frees with fm_free) for the given truth: standard sweep of shear
 * rates, sample temperature near 37 degC, per-step torque series with
 * start-up transient, drift and sensor noise. id and firmware are copied
 * in; taken_at_ms is the measurement time. Returns 0 or FM_ENOMEM. */
int fm_visc_measurement_json(fm_rng *r, const fm_visc_truth *truth, const char *id,
                             const char *firmware, int64_t taken_at_ms, char **out,
                             size_t *out_len);

#endif
