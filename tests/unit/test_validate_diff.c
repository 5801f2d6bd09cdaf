/*
 * Differential test of the measurement validator's two parsers (see
 * src/pipeline/validate_int.h): over the whole fuzz corpus and a few
 * thousand mutations of it, the fast path (simdjson) never accepts what the
 * reference validator (jansson) rejects, what it accepts is bit-for-bit
 * what the reference produces, and fm_measurement_parse_at answers every
 * input with exactly the reference's verdict, code and message.
 */
#include "fleetml/measurement.h"
#include "pipeline/validate_int.h"

#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

/* The corpus is dated 2024-06-01 (see tests/fuzz/fuzz_measurement.c). */
#define NOW_MS 1717243200000LL

typedef struct stats {
    long inputs, fast_ok, ref_ok;
} stats;

static void assert_same_measurement(const fm_measurement *a, const fm_measurement *b)
{
    assert_string_equal(a->id, b->id);
    assert_string_equal(a->kind, b->kind);
    assert_string_equal(a->firmware, b->firmware);
    assert_int_equal(a->taken_at_ms, b->taken_at_ms);
    assert_memory_equal(&a->temperature_c, &b->temperature_c, sizeof(double));
    assert_int_equal(a->n_steps, b->n_steps);
    assert_int_equal(a->n_samples_total, b->n_samples_total);
    for (size_t i = 0; i < a->n_steps; i++) {
        assert_memory_equal(&a->steps[i].shear_rate_s, &b->steps[i].shear_rate_s,
                            sizeof(double));
        assert_int_equal(a->steps[i].n_samples, b->steps[i].n_samples);
        assert_int_equal(a->steps[i].samples - a->sample_buf,
                         b->steps[i].samples - b->sample_buf);
    }
    /* Bit-for-bit, so -0.0 and 0.0 differ here. */
    assert_memory_equal(a->sample_buf, b->sample_buf, a->n_samples_total * sizeof(double));
}

static void check_one(const char *buf, size_t len, stats *st)
{
    fm_measurement ref, fast, both;
    fm_verr eref, eboth;
    memset(&eref, 0, sizeof eref);
    memset(&eboth, 0, sizeof eboth);
    int rref = validate__reference(buf, len, NOW_MS, &ref, &eref);
    int rfast = validate__fast(buf, len, NOW_MS, &fast);
    int rboth = fm_measurement_parse_at(buf, len, NOW_MS, &both, &eboth);
    st->inputs++;
    if (rref == 0)
        st->ref_ok++;
    if (rfast == VALIDATE_FAST_OK) {
        st->fast_ok++;
        if (rref != 0)
            fail_msg("fast path accepted what the reference rejects (%s: %s): %.*s", eref.code,
                     eref.message, (int)(len > 300 ? 300 : len), buf);
        assert_same_measurement(&fast, &ref);
        fm_measurement_free(&fast);
    } else {
        assert_int_equal(rfast, VALIDATE_FAST_UNSURE);
    }
    assert_int_equal(rboth, rref);
    if (rref == 0) {
        assert_same_measurement(&both, &ref);
        fm_measurement_free(&both);
        fm_measurement_free(&ref);
    } else {
        assert_string_equal(eboth.code, eref.code);
        assert_string_equal(eboth.message, eref.message);
    }
}

/* Single-byte changes that turn valid documents into the interesting
 * invalid ones: broken strings and numbers, early ends, NUL, bad UTF-8. */
static const char SUBST[] = {'"', '-', '0', '9', '}', ']', ',', ':', 'x', 'e', '.', ' ', '\\',
                             '\0', (char)0xff, (char)0xc3};

static void check_mutations(const char *buf, size_t len, stats *st)
{
    char *tmp = malloc(len + 64);
    assert_non_null(tmp);
    size_t step = len / 97 + 1;
    for (size_t pos = 0; pos < len; pos += step) {
        check_one(buf, pos, st); /* truncated */
        for (size_t k = 0; k < sizeof SUBST; k++) {
            memcpy(tmp, buf, len);
            tmp[pos] = SUBST[k];
            check_one(tmp, len, st);
        }
        /* An inserted "-0" (integer minus zero) and a repeated key. */
        memcpy(tmp, buf, pos);
        memcpy(tmp + pos, "-0", 2);
        memcpy(tmp + pos + 2, buf + pos, len - pos);
        check_one(tmp, len + 2, st);
    }
    free(tmp);
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static void test_corpus_differential(void **state)
{
    (void)state;
    const char *src = getenv("FM_SOURCE_DIR");
    assert_non_null(src);
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/tests/fuzz/corpus/measurement", src);
    DIR *d = opendir(dir);
    assert_non_null(d);
    stats st = {0};
    long files = 0, valid_files = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        char path[8192];
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        size_t len;
        char *buf = read_file(path, &len);
        long before = st.fast_ok;
        check_one(buf, len, &st);
        if (strncmp(de->d_name, "valid-", 6) == 0) {
            /* Every valid seed is valid on the fast path itself. */
            assert_int_equal(st.fast_ok, before + 1);
            valid_files++;
        }
        check_mutations(buf, len, &st);
        free(buf);
        files++;
    }
    closedir(d);
    print_message("%ld corpus files (%ld valid), %ld inputs, reference accepted %ld, fast path "
                  "%ld\n",
                  files, valid_files, st.inputs, st.ref_ok, st.fast_ok);
    assert_true(files >= 40);
    assert_true(valid_files >= 5);
    /* The mutations must reach both sides, or the test proves little. */
    assert_true(st.ref_ok > valid_files && st.inputs - st.ref_ok > 1000);
}

/* Inputs the corpus does not hold: number spellings and escapes where the
 * two parsers could plausibly differ. */
static void test_number_and_escape_spellings(void **state)
{
    (void)state;
    static const char *const samples[] = {
        "1", "-1", "0", "-0", "-0.0", "0.0", "1e2", "1E+2", "1.5e-3", "4.9e-324", "1e-400",
        "2.2250738585072011e-308", "999999.99999999999", "1000000", "1000000.0000000001",
        "-1000000", "0.30000000000000004", "123456789012345678", "1.00000000000000011102230246251565404236316680908203125",
        "1e999", "-", "01", "1.", ".5", "+1", "0x10", "Infinity", "NaN", "true", "null", "\"1\"",
    };
    static const char *const ids[] = {"\"m-1\"", "\"\\u006d-1\"", "\"m\\u0000\"", "\"m\\/1\"",
                                      "\"\\ud83d\\ude00\"", "\"\\ud800\""};
    static const char *const keys[] = {"\"samples\"", "\"sampl\\u0065s\"", "\"samples\\u0000\""};
    stats st = {0};
    char doc[1024];
    for (size_t i = 0; i < sizeof samples / sizeof *samples; i++)
        for (size_t j = 0; j < sizeof ids / sizeof *ids; j++)
            for (size_t k = 0; k < sizeof keys / sizeof *keys; k++) {
                int n = snprintf(doc, sizeof doc,
                                 "{\"id\":%s,\"taken_at\":\"2024-06-01T10:00:00Z\","
                                 "\"kind\":\"viscosity.sweep.v1\",\"temperature_c\":37,"
                                 "\"sweep\":[{\"shear_rate_s\":1,%s:[%s,2,3]},"
                                 "{\"shear_rate_s\":10,\"samples\":[1,2,%s]}],"
                                 "\"firmware\":\"1.0\",\"meta\":{\"a\":%s}}",
                                 ids[j], keys[k], samples[i], samples[i], samples[i]);
                check_one(doc, (size_t)n, &st);
            }
    assert_true(st.fast_ok > 0 && st.ref_ok > st.fast_ok);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_corpus_differential),
        cmocka_unit_test(test_number_and_escape_spellings),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
