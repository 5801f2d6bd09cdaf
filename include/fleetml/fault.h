/*
 * Fault injection for soak runs and tests.
 *
 * The database's fsyncs do not go through fm_fsync_fd (SQLite calls fsync
 * itself), so the SQLite backend opens every handle through a thin VFS
 * named "fleetml" (src/store/sqlite_vfs.c) that forwards everything to the
 * default unix VFS, except that its xSync first consults the counter below:
 * while it is positive, a sync is not performed and reports
 * SQLITE_IOERR_FSYNC (the counter is decremented), exactly as a failing
 * fsync(2) would be reported.
 *
 * The counter is process-wide and shared by every database handle (the
 * pipeline's, the lake writer's, the registry's). Files written through
 * fm_fsync_fd (lake objects, keys, outbox entries) have their own counter:
 * fm_fsync_fail_next() in core.h.
 *
 * `fleetml serve` exposes both on POST /debug/fault?fsync=N[&file_fsync=M]
 * only when started with FM_FAULT_INJECTION=1 in its environment.
 */
#ifndef FLEETML_FAULT_H
#define FLEETML_FAULT_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Makes the next n database syncs fail (n <= 0 clears the counter). */
void fm_fault_fsync_fail_next(int n);
/* Failures still to be injected. */
int fm_fault_fsync_pending(void);
/* Takes one pending failure: true when the caller must fail its sync. */
bool fm_fault_fsync_take(void);
/* Syncs failed on purpose since the process started. */
uint64_t fm_fault_fsync_injected(void);

/* True when FM_FAULT_INJECTION=1 is set in the environment. */
bool fm_fault_enabled_by_env(void);

/* Registers the "fleetml" SQLite VFS once (thread-safe) and returns its
 * name for sqlite3_open_v2, or NULL (use the default VFS) if it could not
 * be registered. */
const char *fm_sqlite_vfs_name(void);

#ifdef __cplusplus
}
#endif
#endif
