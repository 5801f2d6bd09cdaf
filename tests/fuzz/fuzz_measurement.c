/*
 * libFuzzer target: the measurement validator (contract v1) and the
 * feature extraction that serving runs on whatever it accepts.
 *
 * Input: a raw MQTT payload for fleet/<id>/measurements. Mirrors the
 * pipeline: fm_measurement_parse_at (the wall clock replaced by a fixed
 * "now" so that a crash reproduces whatever the date), fm_measurement_peek_id
 * on rejected input, and fm_features_extract on accepted input. Checks the
 * documented post-conditions on top of ASan/UBSan, and the differential
 * promise of the validator's two parsers (pipeline/validate_int.h): what
 * the fast path accepts, the reference accepts, bit for bit the same.
 */
#include "fleetml/measurement.h"
#include "fleetml/model.h"
#include "fuzz_common.h"
#include "pipeline/validate_int.h"

#include <math.h>

/* 2024-06-01T12:00:00Z; the seed corpus is dated the same day. */
#define FUZZ_NOW_MS 1717243200000LL

static void check_accepted(const fm_measurement *m)
{
    FUZZ_CHECK(strcmp(m->kind, FM_MEAS_KIND_V1) == 0);
    size_t idlen = strnlen(m->id, sizeof m->id);
    FUZZ_CHECK(idlen >= 1 && idlen <= FM_MEAS_ID_MAX);
    FUZZ_CHECK(strnlen(m->firmware, sizeof m->firmware) <= FM_MEAS_FIRMWARE_MAX);
    FUZZ_CHECK(m->taken_at_ms <= FUZZ_NOW_MS + FM_MEAS_FUTURE_MAX_MS);
    FUZZ_CHECK(isfinite(m->temperature_c) && m->temperature_c >= FM_MEAS_TEMP_MIN_C &&
               m->temperature_c <= FM_MEAS_TEMP_MAX_C);
    FUZZ_CHECK(m->n_steps >= FM_MEAS_MIN_STEPS && m->n_steps <= FM_MEAS_MAX_STEPS);
    size_t total = 0;
    for (size_t i = 0; i < m->n_steps; i++) {
        const fm_sweep_step *st = &m->steps[i];
        FUZZ_CHECK(isfinite(st->shear_rate_s) && st->shear_rate_s >= FM_MEAS_SHEAR_MIN &&
                   st->shear_rate_s <= FM_MEAS_SHEAR_MAX);
        FUZZ_CHECK(st->n_samples >= FM_MEAS_MIN_SAMPLES && st->n_samples <= FM_MEAS_MAX_SAMPLES);
        FUZZ_CHECK(st->samples >= m->sample_buf &&
                   st->samples + st->n_samples <= m->sample_buf + m->n_samples_total);
        for (size_t k = 0; k < st->n_samples; k++) {
            double x = st->samples[k]; /* ASan: every sample is inside sample_buf */
            FUZZ_CHECK(isfinite(x) && fabs(x) <= FM_MEAS_SAMPLE_ABS_MAX);
        }
        total += st->n_samples;
    }
    FUZZ_CHECK(total == m->n_samples_total);
}

static void check_same(const fm_measurement *a, const fm_measurement *b)
{
    FUZZ_CHECK(strcmp(a->id, b->id) == 0 && strcmp(a->kind, b->kind) == 0 &&
               strcmp(a->firmware, b->firmware) == 0);
    FUZZ_CHECK(a->taken_at_ms == b->taken_at_ms);
    FUZZ_CHECK(memcmp(&a->temperature_c, &b->temperature_c, sizeof(double)) == 0);
    FUZZ_CHECK(a->n_steps == b->n_steps && a->n_samples_total == b->n_samples_total);
    for (size_t i = 0; i < a->n_steps; i++) {
        FUZZ_CHECK(memcmp(&a->steps[i].shear_rate_s, &b->steps[i].shear_rate_s,
                          sizeof(double)) == 0);
        FUZZ_CHECK(a->steps[i].n_samples == b->steps[i].n_samples);
    }
    FUZZ_CHECK(memcmp(a->sample_buf, b->sample_buf, a->n_samples_total * sizeof(double)) == 0);
}

/* The fast path never accepts what the reference rejects. */
static void check_differential(const char *buf, size_t size)
{
    fm_measurement fast, ref;
    fm_verr e;
    if (validate__fast(buf, size, FUZZ_NOW_MS, &fast) != VALIDATE_FAST_OK)
        return;
    FUZZ_CHECK(validate__reference(buf, size, FUZZ_NOW_MS, &ref, &e) == 0);
    check_same(&fast, &ref);
    fm_measurement_free(&fast);
    fm_measurement_free(&ref);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *buf = fuzz_bytes(data, size);
    fm_measurement m;
    fm_verr e;
    memset(&e, 0, sizeof e);
    check_differential(buf, size);
    int rc = fm_measurement_parse_at(buf, size, FUZZ_NOW_MS, &m, &e);
    if (rc == 0) {
        check_accepted(&m);
        float feat[FM_FEATURES_MAX];
        fm_verr fe;
        memset(&fe, 0, sizeof fe);
        FUZZ_CHECK(fm_feature_count() <= FM_FEATURES_MAX);
        int frc = fm_features_extract(&m, feat, &fe);
        if (frc == 0) {
            /* The model gets these as is: they must be finite. */
            for (size_t i = 0; i < fm_feature_count(); i++)
                FUZZ_CHECK(isfinite(feat[i]));
        } else {
            FUZZ_CHECK(frc == FM_ERANGE);
            FUZZ_CHECK(strcmp(fe.code, FM_VERR_OUT_OF_RANGE) == 0);
            FUZZ_CHECK(fuzz_printable(fe.message, sizeof fe.message));
        }
        fm_measurement_free(&m);
    } else {
        FUZZ_CHECK(rc == FM_EINVAL || rc == FM_ENOMEM);
        FUZZ_CHECK(e.code[0] != '\0');
        FUZZ_CHECK(fuzz_printable(e.code, sizeof e.code));
        /* Embedded as is in the JSON error reply. */
        FUZZ_CHECK(fuzz_printable(e.message, sizeof e.message));
        char id[FM_MEAS_ID_MAX + 1];
        fm_measurement_peek_id(buf, size, id);
        FUZZ_CHECK(strnlen(id, sizeof id) <= FM_MEAS_ID_MAX);
    }
    free(buf);
    return 0;
}
