/*
 * Simulated cone-plate viscometer. See docs/model.md for the physics, the
 * population the samples are drawn from and the noise model; this file is
 * the executable version of that note, so keep the two in step.
 */
#include "fleetml/viscometer.h"
#include "fleetml/measurement.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

/* ---- PRNG --------------------------------------------------------------- */

/* splitmix64 spreads a single 64-bit seed over the four state words; it is
 * the seeding procedure recommended for the xoshiro family because it never
 * produces the all-zero state. */
static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void fm_rng_seed(fm_rng *r, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&x);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t fm_rng_next(fm_rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double fm_rng_uniform(fm_rng *r)
{
    /* The top 53 bits fill a double's mantissa exactly, so every value is
     * representable and 1.0 is never returned. */
    return (double)(fm_rng_next(r) >> 11) * 0x1.0p-53;
}

double fm_rng_normal(fm_rng *r, double mu, double sigma)
{
    /* Box-Muller, using one of the two variates. Discarding the second one
     * wastes a draw but keeps the generator free of hidden cached state, so
     * copying an fm_rng copies the whole stream. 1 - u is in (0, 1], which
     * keeps log() finite. */
    double u1 = 1.0 - fm_rng_uniform(r);
    double u2 = fm_rng_uniform(r);
    return mu + sigma * sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

static double clampd(double v, double lo, double hi) { return v < lo ? lo : v > hi ? hi : v; }

/* ---- physics ------------------------------------------------------------- */

/* Reference shear rates that define the two viscosity outputs. */
#define HIGH_SHEAR 300.0
#define LOW_SHEAR 1.0
/* Viscosity falls about 2.5 % per degC around body temperature; an
 * exponential (Arrhenius-like over a few degrees) keeps it positive. */
#define TEMP_COEF 0.025
#define TEMP_REF 37.0

/* Quemada's model writes whole blood as a suspension whose effective
 * packing parameter k moves between k0 (aggregated, rest) and kinf (fully
 * dispersed and aligned) as the shear rate g passes a critical rate gc:
 *   eta = eta_p * (1 - k H / 2)^-2,  k = (k0 + kinf s) / (1 + s),
 *   s = sqrt(g / gc).
 * The hematocrit dependence of k0, kinf and gc below are the cubic
 * exponential fits to Cokelet-type data commonly used with the model. */
static double quemada_k0(double h) { return exp(3.874 - 10.41 * h + 13.8 * h * h - 6.738 * h * h * h); }
static double quemada_kinf(double h)
{
    return exp(1.3435 - 2.803 * h + 2.711 * h * h - 0.6479 * h * h * h);
}
static double quemada_gc(double h)
{
    return exp(-6.1508 + 27.923 * h - 25.6 * h * h + 3.697 * h * h * h);
}

/* The largest value of k*H/2 we let a sample reach. Quemada's viscosity
 * diverges at k H / 2 = 1 (the suspension jams); staying below keeps every
 * drawn sample finite with a margin. */
#define KH_MAX 0.93

static double quemada_eta(double eta_p, double h, double k)
{
    double x = 1.0 - 0.5 * k * h;
    if (x < 1.0 - KH_MAX)
        x = 1.0 - KH_MAX;
    return eta_p / (x * x);
}

/* The packing parameter that reproduces viscosity eta at hematocrit h. */
static double k_from_eta(double eta_p, double h, double eta)
{
    if (eta <= eta_p || h <= 0.0)
        return 0.0;
    return 2.0 * (1.0 - sqrt(eta_p / eta)) / h;
}

double fm_visc_true_viscosity(const fm_visc_truth *t, double shear_rate_s, double temp_c)
{
    /* The truth record carries the two anchor viscosities rather than the
     * latent k0/kinf, so the curve is rebuilt from them: with gc fixed by the
     * hematocrit, k(1/s) and k(300/s) give two linear equations in k0 and
     * kinf. The curve therefore passes exactly through the recorded labels,
     * and a truth built by hand (for a test) still yields a Quemada curve. */
    double h = t->hematocrit_pct / 100.0;
    double gc = quemada_gc(h);
    double s_lo = sqrt(LOW_SHEAR / gc), s_hi = sqrt(HIGH_SHEAR / gc);
    double a_lo = k_from_eta(t->plasma_mpas, h, t->viscosity_low_mpas) * (1.0 + s_lo);
    double a_hi = k_from_eta(t->plasma_mpas, h, t->viscosity_high_mpas) * (1.0 + s_hi);
    double kinf = (a_lo - a_hi) / (s_lo - s_hi);
    double k0 = a_lo - kinf * s_lo;
    double g = shear_rate_s > 0.0 ? shear_rate_s : 0.0;
    double s = sqrt(g / gc);
    double k = (k0 + kinf * s) / (1.0 + s);
    return quemada_eta(t->plasma_mpas, h, k) * exp(-TEMP_COEF * (temp_c - TEMP_REF));
}

void fm_visc_draw_truth(fm_rng *r, fm_visc_truth *out)
{
    fm_visc_draw_truth_shifted(r, 0.0, out);
}

void fm_visc_draw_truth_shifted(fm_rng *r, double hct_shift, fm_visc_truth *out)
{
    /* Hospital population: most patients are within 35..50 % hematocrit,
     * but anaemic and polycythaemic patients are exactly the ones a
     * viscosity test is ordered for, so one draw in six comes from the
     * whole 20..65 % range. */
    double hct;
    if (fm_rng_uniform(r) < 1.0 / 6.0)
        hct = 20.0 + 45.0 * fm_rng_uniform(r);
    else
        hct = clampd(fm_rng_normal(r, 42.0, 5.0), 20.0, 65.0);
    hct = clampd(hct + hct_shift, 20.0, 65.0);
    double eta_p = clampd(fm_rng_normal(r, 1.22, 0.06), 1.10, 1.35);
    /* Aggregation (fibrinogen, acute-phase proteins) raises the rest-state
     * packing k0; deformability (membrane stiffness) moves kinf. Both are
     * standard-normal scores scaled to a few percent, clipped at 2.5
     * sigma so no draw jams the suspension. */
    double agg = clampd(fm_rng_normal(r, 0.0, 1.0), -2.5, 2.5);
    double dfm = clampd(fm_rng_normal(r, 0.0, 1.0), -2.5, 2.5);
    double h = hct / 100.0;
    double k0 = quemada_k0(h) * (1.0 + 0.07 * agg);
    double kinf = quemada_kinf(h) * (1.0 + 0.025 * dfm);
    double kmax = 2.0 * KH_MAX / h;
    if (k0 > kmax)
        k0 = kmax;
    if (kinf > k0)
        kinf = k0;
    double gc = quemada_gc(h);
    double s_lo = sqrt(LOW_SHEAR / gc), s_hi = sqrt(HIGH_SHEAR / gc);
    out->hematocrit_pct = hct;
    out->plasma_mpas = eta_p;
    out->viscosity_low_mpas = quemada_eta(eta_p, h, (k0 + kinf * s_lo) / (1.0 + s_lo));
    out->viscosity_high_mpas = quemada_eta(eta_p, h, (k0 + kinf * s_hi) / (1.0 + s_hi));
}

/* ---- instrument ---------------------------------------------------------- */

/* The standard sweep: log-spaced-ish set points from 1 to 450 1/s, the
 * range a bench cone-plate instrument covers for blood. */
static const double sweep_rates[] = {1, 2, 5, 10, 20, 50, 100, 200, 300, 450};
#define N_RATES (sizeof sweep_rates / sizeof sweep_rates[0])
#define SAMPLE_HZ 10.0

/* Torque (uN*m) that produces apparent viscosity eta (mPa*s) at shear rate
 * g for the fixed cone: M = tau * 2 pi R^3 / 3, tau = eta * g. */
static double torque_unm(double eta_mpas, double g)
{
    double r = FM_VISC_CONE_RADIUS_M;
    double tau_pa = eta_mpas * 1e-3 * g;
    return tau_pa * 2.0 * M_PI * r * r * r / 3.0 * 1e6;
}

/* Rounds to 5 significant decimals below the uN*m unit: a real sensor's ADC
 * step is of that order, and it keeps the JSON short. */
static double quantise(double v) { return round(v * 1e5) / 1e5; }

static int add_step(json_t *sweep, double g, const double *samples, size_t n)
{
    json_t *step = json_object();
    json_t *arr = json_array();
    if (!step || !arr)
        goto err;
    for (size_t i = 0; i < n; i++)
        if (json_array_append_new(arr, json_real(samples[i])) != 0)
            goto err;
    if (json_object_set_new(step, "shear_rate_s", json_real(g)) != 0)
        goto err;
    if (json_object_set_new(step, "samples", arr) != 0) {
        arr = NULL; /* json_object_set_new consumed it even on failure */
        goto err;
    }
    return json_array_append_new(sweep, step) == 0 ? 0 : FM_ENOMEM;
err:
    json_decref(arr);
    json_decref(step);
    return FM_ENOMEM;
}

int fm_visc_measurement_json(fm_rng *r, const fm_visc_truth *truth, const char *id,
                             const char *firmware, int64_t taken_at_ms, char **out,
                             size_t *out_len)
{
    int rc = FM_ENOMEM;
    json_t *root = NULL, *sweep = NULL;
    char ts[40];
    *out = NULL;
    if (out_len)
        *out_len = 0;

    /* Per-measurement instrument state: sample temperature (a heated
     * stage regulated to about 0.4 degC), step length, zero offset of the
     * torque sensor, a slow drift (evaporation at the cone rim, thermal
     * creep) and the size of the start-up overshoot. */
    double temp = clampd(fm_rng_normal(r, 37.0, 0.4), 35.5, 38.5);
    size_t n = 20 + (size_t)(fm_rng_uniform(r) * 21.0); /* 20..40 samples */
    double zero = fm_rng_normal(r, 0.0, 0.002);
    double drift_per_s = fm_rng_normal(r, 0.0, 0.0015);
    double overshoot = 0.2 + 0.6 * fm_rng_uniform(r);
    double tau_s = 0.15 + 0.25 * fm_rng_uniform(r);
    double samples[40];

    root = json_object();
    sweep = json_array();
    if (!root || !sweep)
        goto out;
    double t_sweep = 0.0;
    for (size_t k = 0; k < N_RATES; k++) {
        double g = sweep_rates[k];
        double m_ss = torque_unm(fm_visc_true_viscosity(truth, g, temp), g);
        /* Rouleaux re-forming and breaking make the transient slower at low
         * shear, so the time constant grows as the rate falls. */
        double tc = tau_s * (1.0 + 0.5 / sqrt(g));
        for (size_t i = 0; i < n; i++) {
            double t = (double)i / SAMPLE_HZ;
            double m = m_ss * (1.0 + overshoot * exp(-t / tc)) *
                       (1.0 + drift_per_s * (t_sweep + t));
            /* Noise: an absolute floor from the sensor electronics plus a
             * relative part from bearing friction and vibration. */
            double sd = sqrt(0.008 * 0.008 + (0.008 * m) * (0.008 * m));
            m += zero + fm_rng_normal(r, 0.0, sd);
            /* Occasional spikes (a bubble, a knock on the bench) exercise
             * the robustness of the feature extractor. */
            if (fm_rng_uniform(r) < 0.01)
                m += (fm_rng_uniform(r) < 0.5 ? -1.0 : 1.0) * (0.05 + 0.3 * m_ss);
            samples[i] = quantise(m);
        }
        t_sweep += (double)n / SAMPLE_HZ;
        rc = add_step(sweep, g, samples, n);
        if (rc != 0)
            goto out;
    }
    rc = FM_ENOMEM;
    fm_rfc3339(taken_at_ms, ts, sizeof ts);
    if (json_object_set_new(root, "id", json_string(id)) != 0 ||
        json_object_set_new(root, "taken_at", json_string(ts)) != 0 ||
        json_object_set_new(root, "kind", json_string(FM_MEAS_KIND_V1)) != 0 ||
        json_object_set_new(root, "temperature_c", json_real(round(temp * 100.0) / 100.0)) != 0)
        goto out;
    if (json_object_set_new(root, "sweep", sweep) != 0) {
        sweep = NULL;
        goto out;
    }
    sweep = NULL;
    if (json_object_set_new(root, "firmware", json_string(firmware)) != 0)
        goto out;

    /* jansson allocates with malloc; copy into an fm_malloc buffer so the
     * caller frees with fm_free as the header promises. */
    char *s = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(8));
    if (!s)
        goto out;
    size_t len = strlen(s);
    *out = fm_malloc(len + 1);
    if (*out) {
        memcpy(*out, s, len + 1);
        if (out_len)
            *out_len = len;
        rc = 0;
    }
    free(s);
out:
    json_decref(sweep);
    json_decref(root);
    return rc;
}
