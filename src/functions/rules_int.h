/* Internals of the rules engine shared by its files (rules__ names). */
#ifndef FLEETML_RULES_INT_H
#define FLEETML_RULES_INT_H

#include "fleetml/functions.h"
#include "fleetml/rules.h"

#include <curl/curl.h>
#include <jansson.h>
#include <limits.h>

/* What a delivery needs: the engine's store handle, the lake, this node's
 * functions and a reusable HTTP handle (keep-alive to webhooks). */
typedef struct rules_ctx {
    fm_store *st;
    fm_lake *lake;
    fm_fn_registry *functions;
    CURL *curl;
    bool loopback_webhooks; /* rules.loopback_webhooks */
} rules_ctx;

/* Delivers every value of outputs (an array) to target, for event. 0 or
 * the first failure (err says what). targets.c. */
int rules__deliver(rules_ctx *c, json_t *target, json_t *event, json_t *outputs,
                   fm_errbuf *err);
/* Hex HMAC-SHA256 of "<timestamp>.<body>" keyed by secret into hex (>= 65
 * bytes). 0, FM_ENOMEM, FM_ECRYPTO. */
int rules__signature(const char *secret, const char *timestamp, const char *body, char *hex,
                     size_t hex_len);
/* A lake key for an event's object under prefix (n > 0: the n-th output). */
int rules__object_key(char *buf, size_t len, const char *prefix, json_t *event, int n);
/* Publishes text as the object key. 0 or the lake's error. */
int rules__lake_put(rules_ctx *c, const char *key, const char *text, fm_errbuf *err);

#endif
