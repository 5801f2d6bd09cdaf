/*
 * Small jansson helpers shared by every module that writes JSON documents
 * (the HTTP API, the store's lake documents, the lake writer).
 */
#ifndef FLEETML_JSON_H
#define FLEETML_JSON_H

#include "fleetml/core.h"

#include <jansson.h>

/* A JSON string for s, or null when s is NULL or not valid UTF-8 (a value
 * that cannot be represented must not make a whole document fail). NULL
 * only when out of memory. */
json_t *fm_json_str(const char *s);
/* ms as an RFC 3339 UTC string with milliseconds, or null when ms <= 0
 * ("never"). NULL only when out of memory. */
json_t *fm_json_time(int64_t ms);

#endif
