/*
 * Device contract v1: parsing and validation of `viscosity.sweep.v1`
 * measurements (see docs/protocol.md). All input is untrusted: the parser
 * checks size, JSON syntax, types, ranges and finiteness and reports the
 * first problem with a machine code and a message that says where it is.
 */
#ifndef FLEETML_MEASUREMENT_H
#define FLEETML_MEASUREMENT_H

#include "fleetml/contract.h"
#include "fleetml/core.h"
#include <stdbool.h>

#define FM_MEAS_KIND_V1 "viscosity.sweep.v1"
#define FM_MEAS_MAX_BYTES (128 * 1024)
#define FM_MEAS_FIRMWARE_MAX 64
#define FM_MEAS_META_MAX 4096
#define FM_MEAS_MIN_STEPS 2
#define FM_MEAS_MAX_STEPS 64
#define FM_MEAS_MIN_SAMPLES 3
#define FM_MEAS_MAX_SAMPLES 4096
#define FM_MEAS_TEMP_MIN_C 10.0
#define FM_MEAS_TEMP_MAX_C 45.0
#define FM_MEAS_SHEAR_MIN 0.01
#define FM_MEAS_SHEAR_MAX 5000.0
#define FM_MEAS_SAMPLE_ABS_MAX 1.0e6

/* How far in the future (relative to the server's wall clock) taken_at may
 * lie; device clocks drift, but a day ahead means a broken clock. */
#define FM_MEAS_FUTURE_MAX_MS (24LL * 3600 * 1000)


/* Error codes (FM_VERR_*) and id grammars: fleetml/contract.h. */

/* Structured validation error: code is one of FM_VERR_*, message names the
 * field path (e.g. "sweep[2].samples[7]: expected a finite number"). The
 * message is always printable ASCII (other bytes become '?'), so it can be
 * embedded in a JSON reply as is even when it quotes hostile input. */
typedef struct fm_verr {
    char code[32];
    char message[256];
} fm_verr;

/* Sets e->code/e->message; returns FM_EINVAL (for `return fm_verrf(...)`). */
int fm_verrf(fm_verr *e, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

typedef struct fm_sweep_step {
    double shear_rate_s;   /* set shear rate, 1/s */
    const double *samples; /* points into fm_measurement.sample_buf */
    size_t n_samples;
} fm_sweep_step;

typedef struct fm_measurement {
    char id[FM_MEAS_ID_MAX + 1];
    char kind[32];
    char firmware[FM_MEAS_FIRMWARE_MAX + 1];
    int64_t taken_at_ms;
    double temperature_c;
    size_t n_steps;
    fm_sweep_step steps[FM_MEAS_MAX_STEPS];
    double *sample_buf; /* owned; all steps' samples back to back */
    size_t n_samples_total;
} fm_measurement;

/* Parses and validates a measurement payload (not necessarily
 * NUL-terminated). On success fills *m (release with fm_measurement_free)
 * and returns 0. On failure returns FM_EINVAL (or FM_ENOMEM) with *e set,
 * and *m holds nothing that needs freeing. */
int fm_measurement_parse(const char *buf, size_t len, fm_measurement *m, fm_verr *e);

/* Same as fm_measurement_parse, but judges taken_at against now_ms (ms since
 * the Unix epoch) instead of the wall clock, so tests are deterministic.
 * Allocation failure returns FM_ENOMEM with code "internal". */
int fm_measurement_parse_at(const char *buf, size_t len, int64_t now_ms, fm_measurement *m,
                            fm_verr *e);

/* Releases what fm_measurement_parse allocated; safe on a zeroed struct. */
void fm_measurement_free(fm_measurement *m);

/* Best-effort extraction of the "id" string from a payload that failed
 * validation, so the error reply can still name the measurement. Copies at
 * most FM_MEAS_ID_MAX chars into out (size >= FM_MEAS_ID_MAX + 1); out is ""
 * when there is no usable id. */
void fm_measurement_peek_id(const char *buf, size_t len, char *out);

#endif
