/*
 * The measurement validator's fast path: simdjson's DOM parser behind one C
 * function (validate__fast, see validate_int.h for the contract).
 *
 * Why a second parser: jansson builds a tree with one allocation per value
 * and parses each number with strtod; for a 3.3 KB sweep of ~300 numbers
 * that was ~80 % of the pipeline's CPU. simdjson validates UTF-8 and finds
 * the structure with SIMD instructions, then parses every number into one
 * flat tape, with no allocation per value. Its DOM API is used rather than
 * On-Demand: this simdjson (3.0) picks On-Demand's kernels at compile time
 * only (portable code for a generic x86-64 build), while the DOM parser
 * dispatches at run time to the CPU's kernels (AVX2, SSE4.2, NEON); the
 * DOM also checks every value of the document, skipped or not.
 *
 * Why it may only say "valid" or "unsure": error messages, their codes and
 * their order are the device contract, defined by the reference validator
 * in validate.c. Rather than re-creating that order here (and risking a
 * different code for the same payload), every doubt is handed back and the
 * reference decides. The cost of an invalid payload is then the reference
 * parse, as before; valid payloads, nearly all traffic, take this path.
 *
 * What makes "valid here" imply "valid there" (checked by the differential
 * test over the fuzz corpus and by the fuzz target):
 * - the whole document is valid JSON (simdjson's DOM checks it all), every
 *   value outside `meta` is type- and range-checked here, and `meta` is
 *   re-serialised and handed to jansson (validate__meta_fits), which
 *   applies its own rules (duplicates, size) to it;
 * - duplicate keys (jansson runs with JSON_REJECT_DUPLICATES) and unknown
 *   keys are detected with a bit per known key, on unescaped keys as
 *   jansson compares them;
 * - strings whose content matters (id, kind, taken_at, firmware) pass the
 *   same character checks, which also exclude NUL and control bytes that
 *   jansson refuses in any string;
 * - numbers: simdjson and glibc's strtod both round correctly, and both
 *   refuse literals that overflow a double; integers beyond 64 bits, which
 *   simdjson refuses, go to the reference. The one difference is the
 *   integer literal -0, an integer 0 for simdjson and -0.0 for jansson: a
 *   payload with one goes to the reference too;
 * - nothing may follow the top-level object.
 *
 */
#include "pipeline/validate_int.h"

#include <simdjson.h>

#include <cmath>
#include <cstring>
#include <string>
#include <string_view>

namespace {

/* Per-thread scratch: the parser, a padded copy of the payload and the
 * samples of the document being walked. Grown when a payload is larger than
 * any before, freed at thread exit. Reached once per call and passed down
 * (each access to a thread_local with a constructor costs a call). */
struct scratch {
    simdjson::dom::parser parser;
    char *padded = nullptr;
    size_t cap = 0;
    double *samples = nullptr;
    size_t n_samples = 0, samples_cap = 0;
    std::string meta; /* minified `meta` */
    ~scratch()
    {
        fm_free(padded);
        fm_free(samples);
    }
};

thread_local scratch tls;

enum : unsigned {
    F_ID = 1u << 0,
    F_KIND = 1u << 1,
    F_TAKEN = 1u << 2,
    F_TEMP = 1u << 3,
    F_SWEEP = 1u << 4,
    F_FIRMWARE = 1u << 5,
    F_META = 1u << 6,
    F_REQUIRED = F_ID | F_KIND | F_TAKEN | F_TEMP | F_SWEEP | F_FIRMWARE,
};

unsigned field_bit(std::string_view key)
{
    static const struct {
        std::string_view name;
        unsigned bit;
    } fields[] = {{"id", F_ID},       {"kind", F_KIND},         {"taken_at", F_TAKEN},
                  {"temperature_c", F_TEMP}, {"sweep", F_SWEEP}, {"firmware", F_FIRMWARE},
                  {"meta", F_META}};
    for (const auto &f : fields)
        if (key == f.name)
            return f.bit;
    return 0;
}

bool number_ok(double d, double lo, double hi) { return std::isfinite(d) && d >= lo && d <= hi; }

bool printable(std::string_view s)
{
    for (unsigned char c : s)
        if (c < 0x20 || c > 0x7e)
            return false;
    return true;
}

/* The checks on id, kind, taken_at and firmware, as validate.c makes them. */
bool text_ok(unsigned bit, std::string_view s, int64_t now_ms, fm_measurement *m)
{
    switch (bit) {
    case F_ID:
        if (!fm_measurement_id_valid(s.data(), s.size()))
            return false;
        memcpy(m->id, s.data(), s.size());
        m->id[s.size()] = '\0';
        return true;
    case F_KIND:
        if (s != FM_MEAS_KIND_V1)
            return false;
        memcpy(m->kind, FM_MEAS_KIND_V1, sizeof FM_MEAS_KIND_V1);
        return true;
    case F_TAKEN: {
        /* A longer text, or one with control bytes, is unusual enough
         * for the reference to judge. */
        char text[64];
        int64_t ms;
        if (s.size() >= sizeof text || !printable(s))
            return false;
        memcpy(text, s.data(), s.size());
        text[s.size()] = '\0';
        if (fm_rfc3339_parse(text, &ms) != 0 || (ms > now_ms && ms - now_ms > FM_MEAS_FUTURE_MAX_MS))
            return false;
        m->taken_at_ms = ms;
        return true;
    }
    case F_FIRMWARE:
        if (s.size() < 1 || s.size() > FM_MEAS_FIRMWARE_MAX || !printable(s))
            return false;
        memcpy(m->firmware, s.data(), s.size());
        m->firmware[s.size()] = '\0';
        return true;
    }
    return false;
}

/* Appends x to the document's samples; false when out of memory (the
 * reference validator then reports it). */
bool push_sample(scratch &sc, double x)
{
    if (sc.n_samples == sc.samples_cap) {
        size_t cap = sc.samples_cap ? 2 * sc.samples_cap : 1024;
        void *p = fm_realloc(sc.samples, cap * sizeof(double));
        if (!p)
            return false;
        sc.samples = static_cast<double *>(p);
        sc.samples_cap = cap;
    }
    sc.samples[sc.n_samples++] = x;
    return true;
}

/* Closes step i, whose samples start at index first. */
bool end_step(const scratch &sc, bool both_fields, size_t i, size_t first, fm_measurement *m)
{
    size_t ns = sc.n_samples - first;
    if (!both_fields || ns < FM_MEAS_MIN_SAMPLES)
        return false;
    m->steps[i].n_samples = ns;
    return true;
}


using simdjson::dom::element;

bool get_number(element v, double lo, double hi, double *out)
{
    double d;
    if (v.get_double().get(d) || !number_ok(d, lo, hi))
        return false;
    *out = d;
    return true;
}

/* One step {"shear_rate_s": r, "samples": [...]}. */
bool get_step(scratch &sc, element v, size_t i, fm_measurement *m)
{
    simdjson::dom::object step;
    if (v.get_object().get(step))
        return false;
    unsigned seen = 0;
    size_t first = sc.n_samples;
    for (auto [key, val] : step) {
        if (key == "shear_rate_s" && !(seen & 1u)) {
            seen |= 1u;
            double r;
            if (!get_number(val, FM_MEAS_SHEAR_MIN, FM_MEAS_SHEAR_MAX, &r) ||
                (i > 0 && !(r > m->steps[i - 1].shear_rate_s)))
                return false;
            m->steps[i].shear_rate_s = r;
        } else if (key == "samples" && !(seen & 2u)) {
            seen |= 2u;
            simdjson::dom::array arr;
            if (val.get_array().get(arr) || arr.size() > FM_MEAS_MAX_SAMPLES)
                return false;
            for (element el : arr) {
                double x;
                if (!get_number(el, -FM_MEAS_SAMPLE_ABS_MAX, FM_MEAS_SAMPLE_ABS_MAX, &x) ||
                    !push_sample(sc, x))
                    return false;
            }
        } else {
            return false; /* unknown or repeated key */
        }
    }
    return end_step(sc, seen == 3u, i, first, m);
}

bool get_sweep(scratch &sc, element v, fm_measurement *m)
{
    simdjson::dom::array arr;
    if (v.get_array().get(arr))
        return false;
    size_t n = 0;
    for (element step : arr) {
        if (n >= FM_MEAS_MAX_STEPS || !get_step(sc, step, n, m))
            return false;
        n++;
    }
    m->n_steps = n;
    return n >= FM_MEAS_MIN_STEPS;
}

/* The walk over the top-level object; false = unsure. */
bool walk(scratch &sc, element root, int64_t now_ms, fm_measurement *m, element *meta,
          bool *has_meta)
{
    simdjson::dom::object obj;
    if (root.get_object().get(obj))
        return false;
    unsigned seen = 0;
    for (auto [key, val] : obj) {
        unsigned bit = field_bit(key);
        if (!bit || (seen & bit))
            return false; /* unknown or repeated key */
        seen |= bit;
        std::string_view s;
        bool ok;
        switch (bit) {
        case F_TEMP:
            ok = get_number(val, FM_MEAS_TEMP_MIN_C, FM_MEAS_TEMP_MAX_C, &m->temperature_c);
            break;
        case F_SWEEP: ok = get_sweep(sc, val, m); break;
        case F_META:
            *meta = val;
            *has_meta = ok = val.is_object();
            break;
        default: ok = !val.get_string().get(s) && text_ok(bit, s, now_ms, m); break;
        }
        if (!ok)
            return false;
    }
    return (seen & F_REQUIRED) == F_REQUIRED;
}

/* True when the text holds the integer literal -0 (see the top). A match
 * inside a string is harmless: the reference then judges the payload. */
bool has_negative_integer_zero(const char *p, size_t len)
{
    const char *end = p + len;
    while ((p = static_cast<const char *>(memchr(p, '-', static_cast<size_t>(end - p))))) {
        p++;
        if (p < end && *p == '0' &&
            (p + 1 == end || !(p[1] == '.' || p[1] == 'e' || p[1] == 'E' ||
                               (p[1] >= '0' && p[1] <= '9'))))
            return true;
    }
    return false;
}

} // namespace

extern "C" int validate__fast(const char *buf, size_t len, int64_t now_ms, fm_measurement *m)
{
    scratch &sc = tls;
    memset(m, 0, sizeof *m);
    if (!buf || len == 0 || len > FM_MEAS_MAX_BYTES || has_negative_integer_zero(buf, len))
        return VALIDATE_FAST_UNSURE;
    /* simdjson reads up to SIMDJSON_PADDING bytes past the end; copying a
     * few kilobytes costs far less than the parse it enables. */
    size_t need = len + simdjson::SIMDJSON_PADDING;
    if (sc.cap < need) {
        size_t cap = need < 8192 ? 8192 : need;
        char *p = static_cast<char *>(fm_malloc(cap));
        if (!p)
            return FM_ENOMEM;
        fm_free(sc.padded);
        sc.padded = p;
        sc.cap = cap;
    }
    memcpy(sc.padded, buf, len);
    memset(sc.padded + len, 0, simdjson::SIMDJSON_PADDING);
    sc.n_samples = 0;

    element root, meta;
    bool has_meta = false;
    if (sc.parser.parse(sc.padded, len, false).get(root) ||
        !walk(sc, root, now_ms, m, &meta, &has_meta)) {
        memset(m, 0, sizeof *m);
        return VALIDATE_FAST_UNSURE;
    }
    if (has_meta) {
        /* meta is optional and small: jansson judges its minified text. */
        sc.meta = simdjson::minify(meta);
        if (!validate__meta_fits(sc.meta.data(), sc.meta.size())) {
            memset(m, 0, sizeof *m);
            return VALIDATE_FAST_UNSURE;
        }
    }
    size_t total = sc.n_samples;
    double *samples = static_cast<double *>(fm_malloc(total * sizeof(double)));
    if (!samples) {
        memset(m, 0, sizeof *m);
        return FM_ENOMEM;
    }
    memcpy(samples, sc.samples, total * sizeof(double));
    size_t off = 0;
    for (size_t i = 0; i < m->n_steps; i++) {
        m->steps[i].samples = samples + off;
        off += m->steps[i].n_samples;
    }
    m->sample_buf = samples;
    m->n_samples_total = total;
    return VALIDATE_FAST_OK;
}
