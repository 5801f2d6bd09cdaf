/* Fault injection counters (see include/fleetml/fault.h). */
#include "fleetml/fault.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

static _Atomic int fsync_failures;
static _Atomic uint64_t fsync_injected;

void fm_fault_fsync_fail_next(int n) { atomic_store(&fsync_failures, n > 0 ? n : 0); }

int fm_fault_fsync_pending(void) { return atomic_load(&fsync_failures); }

bool fm_fault_fsync_take(void)
{
    int cur = atomic_load(&fsync_failures);
    while (cur > 0) {
        if (atomic_compare_exchange_weak(&fsync_failures, &cur, cur - 1)) {
            atomic_fetch_add(&fsync_injected, 1);
            return true;
        }
    }
    return false;
}

uint64_t fm_fault_fsync_injected(void) { return atomic_load(&fsync_injected); }

bool fm_fault_enabled_by_env(void)
{
    const char *v = getenv("FM_FAULT_INJECTION");
    return v && strcmp(v, "1") == 0;
}
