/*
 * Per-thread arena for jansson's allocations while one untrusted document
 * is parsed, checked and freed. jansson allocates every value separately;
 * a ~300-number sweep means hundreds of malloc/free pairs, which showed up
 * as a fifth of the pipeline's instructions. Inside an arena scope those
 * become pointer bumps and no-ops; outside it (and when the arena is full)
 * allocations go to fm_malloc/fm_free as usual.
 *
 * Rule: every jansson value created inside a scope must be freed before the
 * scope ends (nothing allocated there may escape it).
 */
#ifndef FLEETML_JSONMEM_H
#define FLEETML_JSONMEM_H

#include "fleetml/core.h"

/* Installs the allocator into jansson (process-wide, idempotent, thread-
 * safe). Until it is called, scopes are no-ops. */
void fm_jsonmem_install(void);

/* Opens / closes the calling thread's arena scope. Scopes do not nest. */
void fm_jsonmem_begin(void);
void fm_jsonmem_end(void);

#endif
