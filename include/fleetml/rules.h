/*
 * Rules: per tenant, an event type, a jq filter and transform (libjq), and
 * targets the transformed event is delivered to (docs/functions.md).
 *
 *   {"name": "low-hct", "event": "result.produced",
 *    "filter": ".data.outputs.hematocrit_pct < 30",
 *    "transform": "{device: .data.device, hct: .data.outputs.hematocrit_pct}",
 *    "targets": [{"type": "webhook", "url": "https://his.example/hook",
 *                 "secret": "...", "timeout_ms": 5000},
 *                {"type": "function", "function": "notify"},
 *                {"type": "shadow"},
 *                {"type": "lake", "prefix": "alerts"}],
 *    "retries": 3, "enabled": true}
 *
 * filter: the event passes when the program's first output is neither
 * false nor null ("" or absent: every event passes). transform: each
 * output is delivered ("" or absent: the event itself). Delivery is at
 * least once, in order per rule: a rule's position in its event source
 * moves past an event only once every target took it or, after the last
 * retry, it went to the lake's dead-letter area.
 *
 * The rules engine (fm_rules_start) runs on one node of a cluster at a
 * time (lease "rules"), like the lake export.
 */
#ifndef FLEETML_RULES_H
#define FLEETML_RULES_H

#include "fleetml/config.h"
#include "fleetml/core.h"
#include "fleetml/lake.h"
#include "fleetml/store.h"

#include <jansson.h>
#include <stdbool.h>

#define FM_RULE_NAME_MAX 64
#define FM_RULE_TARGETS_MAX 8
#define FM_RULE_PROGRAM_MAX 4096
#define FM_RULE_RETRIES_MAX 10

/* fm_rule_check flags. */
#define FM_RULE_LOOPBACK_HTTP 1u /* accept http:// webhooks to a loopback address */

/* Checks a rule document as the API and CLI receive it and returns its
 * canonical form (new reference in *out: name, event, filter, transform,
 * targets with defaults filled in, retries, enabled). Refusals are
 * FM_EINVAL with a message naming the field: unknown keys, a name that is
 * not [a-z0-9][a-z0-9-]{0,63}, an unknown event type, a filter or
 * transform jq cannot compile (jq's message), no or too many targets, an
 * unknown target type, a webhook URL that is not https:// (or http:// to
 * a loopback address, with FM_RULE_LOOPBACK_HTTP in flags), a lake prefix that is not a relative path of
 * [a-z0-9_/-] segments, retries outside 0..FM_RULE_RETRIES_MAX. */
int fm_rule_check(json_t *doc, unsigned flags, json_t **out, fm_errbuf *err);
/* true when url is a plain http:// URL to a loopback address. */
bool fm_rule_loopback_url(const char *url);

/* The same document with every target's "secret" replaced by "********"
 * (what the API shows). New reference. */
json_t *fm_rule_redacted(json_t *rule);
/* A stored rule as the API (schema Rule) and `fleetml rules list --json`
 * show it: the redacted document plus tenant, position, updated_by and
 * updated_at. New reference; NULL when out of memory. */
json_t *fm_rule_row_json(const fm_rule_row *row);
/* One delivery attempt of the invocation log (schema RuleInvocation):
 * seq, event_id, target, outcome, attempt, duration_ms, error, at. New
 * reference. */
json_t *fm_rule_log_json(const fm_rule_log *l);

/* A compiled rule's filter and transform. */
typedef struct fm_rule_prog fm_rule_prog;

/* Compiles a checked rule's programs. FM_EINVAL (jq's message in err) or
 * FM_ENOMEM. *out is the caller's, to fm_rule_prog_free. */
int fm_rule_prog_compile(json_t *rule, fm_rule_prog **out, fm_errbuf *err);
void fm_rule_prog_free(fm_rule_prog *p);

/* Runs the filter on event and, when it passes, the transform: *outputs
 * (new reference) is an array of the values to deliver (empty when the
 * event does not pass). A jq runtime error is FM_EINVAL with jq's message
 * (the event is then dead-lettered, not retried: it would fail again).
 * At most 64 outputs are kept. */
int fm_rule_prog_run(fm_rule_prog *p, json_t *event, json_t **outputs, fm_errbuf *err);

/* ---- the engine ------------------------------------------------------------ */

/* The newest position of the source events of type come from (the
 * position a new rule starts at: it sees only what happens after it was
 * created). 0 or the store's error. */
int fm_rules_source_position(fm_store *st, int type, int64_t *pos);

typedef struct fm_rules fm_rules;
struct fm_fn_registry;

typedef struct fm_rules_opts {
    const fm_config *cfg;           /* store, node id; copied */
    fm_lake *lake;                  /* dead letters and lake targets; borrowed */
    struct fm_fn_registry *functions; /* function targets; borrowed, may be NULL */
    int poll_ms;                    /* how often sources are read (250) */
    int retry_base_ms;              /* first retry delay, doubled per retry (1000) */
    bool loopback_webhooks;         /* deliver to http:// on loopback (else refused) */
} fm_rules_opts;

/* Starts the engine thread (its own store connection). 0, FM_ENOMEM, or
 * the store's error opening. */
int fm_rules_start(const fm_rules_opts *opts, fm_rules **out, fm_errbuf *err);
/* Stops the thread and releases the lease. NULL is a no-op. */
void fm_rules_stop(fm_rules *r);

#endif
