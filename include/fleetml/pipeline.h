/*
 * The measurement pipeline: validate -> dedupe -> features -> infer ->
 * group commit -> reply. One pipeline thread owns the write handle of the
 * store and the model; the MQTT thread only copies messages into its queue.
 *
 * Acknowledgement rule: a device's `ok` result is published only after the
 * transaction holding its measurement and result has been committed with
 * synchronous=FULL. Everything rejected is answered with an error result
 * and its raw bytes are kept for the lake's quarantine area (never in the
 * measurement table).
 */
#ifndef FLEETML_PIPELINE_H
#define FLEETML_PIPELINE_H

#include "fleetml/config.h"
#include "fleetml/contract.h"
#include "fleetml/core.h"

struct fm_model;

/* Where the answer to a message goes when it did not come over MQTT (the
 * HTTP predict endpoint with ?store=true): called once, on the pipeline
 * thread, with the reply document (not NUL-terminated beyond len; valid
 * during the call), or with doc NULL when the message is dropped without
 * an answer (fm_inmsg_free of an unanswered message). */
typedef void (*fm_reply_fn)(void *ud, const char *doc, size_t len);

/* A received message (opaque), owned by the pipeline once submitted. */
typedef struct fm_inmsg fm_inmsg;

/* Allocates a message holding copies of the given buffers (device_id from
 * the topic fleet/<device>/measurements; response_topic and corr may be
 * NULL), stamped with the current time as its receipt. Returns NULL on
 * allocation failure. Free with fm_inmsg_free (if not submitted). */
fm_inmsg *fm_inmsg_new(const char *device_id, const void *payload, size_t len,
                       const char *response_topic, const void *corr, size_t corr_len);
/* Sends the answer to fn instead of publishing it over MQTT. Once the
 * message is submitted, fn is called exactly once, on the pipeline thread:
 * with the reply document, or with doc NULL when the pipeline drops the
 * message without an answer. If the submit fails, fn is never called. */
void fm_inmsg_set_reply(fm_inmsg *m, fm_reply_fn fn, void *ud);
/* Overrides the receipt time (fm_mono_ns, wall ms) set by fm_inmsg_new. */
void fm_inmsg_set_received(fm_inmsg *m, uint64_t mono_ns, int64_t wall_ms);
/* Frees a message that was not submitted (or whose submit failed); never
 * calls its reply hook. NULL is a no-op. */
void fm_inmsg_free(fm_inmsg *m);

/* Publishes a reply (QoS 1). Returns 0 or a negative FM_E* code. Called
 * from the pipeline thread only. */
typedef int (*fm_publish_fn)(void *ud, const char *topic, const void *payload, size_t len,
                             const void *corr, size_t corr_len);
/* Called after every successful commit (e.g. to wake the lake writer). */
typedef void (*fm_committed_fn)(void *ud);

typedef struct fm_pipeline fm_pipeline;

struct fm_fn_registry;

typedef struct fm_pipeline_opts {
    const fm_config *cfg;
    fm_publish_fn publish;
    fm_committed_fn committed;
    void *ud;
    /* This node's functions (borrowed, may be NULL): a function whose
     * function.json names a processor group answers the measurements of
     * that group's devices instead of the model (docs/functions.md). */
    struct fm_fn_registry *functions;
} fm_pipeline_opts;

/* Opens the store write handle, loads the model and starts the pipeline
 * thread. Returns 0 and *out, or an FM_E* code with err set (nothing is
 * left running on failure). */
int fm_pipeline_start(const fm_pipeline_opts *opts, fm_pipeline **out, fm_errbuf *err);

/* Hands m to the pipeline (ownership moves on success). Returns 0, or
 * FM_EBUSY when the queue is full / FM_ESTATE when stopping; the caller
 * keeps m on failure, and its reply hook is not called. Thread-safe. */
int fm_pipeline_submit(fm_pipeline *p, fm_inmsg *m);

/* True once the model is loaded and the last commit (if any) succeeded. */
int fm_pipeline_healthy(const fm_pipeline *p);
/* "name@version" of the loaded model (static for the pipeline's life). */
const char *fm_pipeline_model(const fm_pipeline *p);

struct fm_serving;
/* Hands the pipeline a new serving table (fleetml/modelreg.h; ownership
 * moves). The commit thread adopts it before its next batch; a table not
 * adopted yet is replaced. Thread-safe. */
void fm_pipeline_set_serving(fm_pipeline *p, struct fm_serving *s);
/* The generation of the serving table the commit thread scores with (0:
 * the initial, bundled-only one). Thread-safe. */
uint64_t fm_pipeline_serving_in_use(fm_pipeline *p);
struct fm_drift_counts;
/* Takes the live feature counts gathered since the last call (drift,
 * fleetml/drift.h): *out is an fm_malloc'd array the caller frees (NULL
 * when empty); returns its length. Thread-safe. */
size_t fm_pipeline_drift_take(fm_pipeline *p, struct fm_drift_counts **out);
/* The bundled model (slot 0 of every table; owned by the pipeline). */
struct fm_model *fm_pipeline_base_model(fm_pipeline *p);

/* Tells the pipeline that a device's row changed (status, tenant, group,
 * certificate): every cached device row is read again before its next use.
 * Lock-free; callable from any thread. Without it a cached row is trusted
 * for up to a minute. */
void fm_pipeline_devices_changed(fm_pipeline *p);

/* Processes what is queued, stops the thread and frees everything. */
void fm_pipeline_stop(fm_pipeline *p);

/* Builds the JSON error result document for a measurement id (may be "").
 * Caller frees with fm_free. NULL on allocation
 * failure. */
char *fm_error_result_json(const char *measurement_id, const char *code, const char *message);

/* Builds the JSON "ok" result document a device gets for measurement mid:
 * {"id","status":"ok","model":model_ref,"outputs":{name: value rounded to
 * 3 decimals, in the model's output order},"received_at":RFC 3339}. out
 * holds fm_model_output_count(model) values. Caller frees with fm_free;
 * NULL on allocation failure. Shared by the pipeline and HTTP predict so
 * both answer byte-for-byte the same document. */
char *fm_result_ok_json(const struct fm_model *model, const char *model_ref, const char *mid,
                        const float *out, int64_t recv_ms);

#endif
