/*
 * Internals of the measurement validator shared by validate.c, its C++
 * fast path (validate_fast.cpp), the unit tests and the fuzz target.
 *
 * There are two parsers on purpose. The reference validator (jansson) is
 * the contract's definition: it reports every problem with its code and a
 * message that names the field. The fast path (simdjson On-Demand) only
 * answers "this payload is valid, here it is" or "not sure": it never
 * produces an error of its own. fm_measurement_parse_at runs the fast path
 * and, whenever it is not sure, the reference validator, so verdicts, codes
 * and messages are the reference's by construction; the differential test
 * (tests/unit/test_validate.c) and the fuzz target hold the one remaining
 * promise: the fast path never accepts what the reference rejects, and
 * what it accepts is bit-for-bit what the reference would have produced.
 */
#ifndef FLEETML_PIPELINE_VALIDATE_INT_H
#define FLEETML_PIPELINE_VALIDATE_INT_H

#include "fleetml/measurement.h"

#ifdef __cplusplus
extern "C" {
#endif

/* validate__fast's answers. */
#define VALIDATE_FAST_OK 0     /* valid, *m filled (owns sample_buf) */
#define VALIDATE_FAST_UNSURE 1 /* not accepted here: ask the reference; *m zeroed */

/* The fast path. buf need not be padded or NUL-terminated. On OK, *m
 * holds the measurement (release with fm_measurement_free). Returns
 * VALIDATE_FAST_OK, VALIDATE_FAST_UNSURE (also for payloads over
 * FM_MEAS_MAX_BYTES), or FM_ENOMEM; *m is zeroed unless OK. Thread-safe:
 * each thread keeps its own parser and scratch buffers, freed at thread
 * exit. */
int validate__fast(const char *buf, size_t len, int64_t now_ms, fm_measurement *m);

/* The contract's size rule for `meta` (jansson's compact serialisation
 * at most FM_MEAS_META_MAX bytes, no duplicate keys at any depth), on the
 * text of a JSON object: true when it holds. False also when it cannot be
 * judged (out of memory), so the caller asks the reference. */
bool validate__meta_fits(const char *text, size_t len);

/* The reference validator alone (jansson), with the same contract as
 * fm_measurement_parse_at. */
int validate__reference(const char *buf, size_t len, int64_t now_ms, fm_measurement *m,
                        fm_verr *e);

#ifdef __cplusplus
}
#endif

#endif
