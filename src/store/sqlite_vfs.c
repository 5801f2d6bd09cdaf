/*
 * The "fleetml" SQLite VFS: a shim over the default (unix) VFS.
 *
 * Fault injection: every method forwards to the real VFS / real file;
 * xSync first asks fm_fault_fsync_take() and, when a failure is pending,
 * reports SQLITE_IOERR_FSYNC without syncing -- which is what SQLite's
 * unix VFS reports when fsync(2) fails. With no failure pending the cost
 * is one atomic load per sync.
 *
 * Gathered writes: the WAL and main database files it opens gather their
 * writes. SQLite writes each WAL frame as two writes, a 24-byte header and
 * the page, neither aligned to the file system's pages, and a checkpoint
 * copies frames into the database one page per write: a commit of one
 * measurement writes about 7 frames, a batch 4 per row, and each is copied
 * once more. Those small writes cost the kernel 3-5 us each (a frame's pair,
 * or one page); one write of the same bytes costs 0.6-1.6 us a frame
 * (docs/performance.md). So consecutive writes are copied into one buffer
 * and written together before anything that could observe the file or the
 * locks around it: xSync, xRead, xTruncate, xFileSize, xFileControl, xLock,
 * xUnlock, the shared-memory methods, xFetch, xClose, and any write that
 * does not follow on (SQLite rewrites a frame of the open transaction in
 * place).
 *
 * Durability and what other connections see are unchanged, because a
 * sync precedes every moment another connection may read what was
 * written: a commit's frames are synced before the WAL index publishes
 * them, and a checkpoint's pages are synced before it records them as
 * copied -- at synchronous=FULL, which both connections opened with this
 * VFS run (the store's, src/store/sqlite.c, and its checkpointer's,
 * sqlite_ckpt.c). A connection with synchronous=NORMAL or OFF must not use
 * it: a commit (or a checkpoint, at OFF) would publish what is still in
 * the buffer.
 *
 * A shim file is our header followed by the real VFS's file object in the
 * same allocation (szOsFile = ours + theirs); the header's pMethods points
 * at the forwarding methods, and `real` at the embedded real file.
 */
#include "store/sqlite_int.h"
#include "fleetml/fault.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sqlite3.h>
#include <stddef.h>
#include <string.h>

#define SHIM_NAME "fleetml"
/* Bytes a WAL file gathers before it writes them (29 frames of 4 KiB).
 * Below 128 KiB: the unix VFS passes at most 0x1ffff bytes to one pwrite
 * and fails a write whose remainder is a multiple of 128 KiB. */
#define GATHER_MAX (120 * 1024)

typedef struct shim_file {
    sqlite3_file base;  /* must be first: SQLite sees this */
    sqlite3_file *real; /* points just past this struct */
    /* WAL files of "fleetml-gather" only: writes not yet made, the bytes
     * of [at, at + len) (allocated at the first write, GATHER_MAX). */
    unsigned char *gather;
    sqlite3_int64 at;
    size_t len;
} shim_file;

static sqlite3_vfs shim_vfs;
/* SQLite's writes to gathering WAL files, and the writes made of them. */
static atomic_uint_least64_t gathered_writes, gather_flushes;
static sqlite3_vfs *root_vfs;

#define REAL(f) (((shim_file *)(f))->real)
#define RM(f) (REAL(f)->pMethods)

static int shim_close(sqlite3_file *f)
{
    int rc = SQLITE_OK;
    if (RM(f))
        rc = RM(f)->xClose(REAL(f));
    return rc;
}
static int shim_read(sqlite3_file *f, void *buf, int amt, sqlite3_int64 off)
{
    return RM(f)->xRead(REAL(f), buf, amt, off);
}
static int shim_write(sqlite3_file *f, const void *buf, int amt, sqlite3_int64 off)
{
    return RM(f)->xWrite(REAL(f), buf, amt, off);
}
static int shim_truncate(sqlite3_file *f, sqlite3_int64 size)
{
    return RM(f)->xTruncate(REAL(f), size);
}
static int shim_sync(sqlite3_file *f, int flags)
{
    if (fm_fault_fsync_take())
        return SQLITE_IOERR_FSYNC;
    return RM(f)->xSync(REAL(f), flags);
}
static int shim_file_size(sqlite3_file *f, sqlite3_int64 *size)
{
    return RM(f)->xFileSize(REAL(f), size);
}
static int shim_lock(sqlite3_file *f, int lvl) { return RM(f)->xLock(REAL(f), lvl); }
static int shim_unlock(sqlite3_file *f, int lvl) { return RM(f)->xUnlock(REAL(f), lvl); }
static int shim_check_reserved(sqlite3_file *f, int *out)
{
    return RM(f)->xCheckReservedLock(REAL(f), out);
}
static int shim_file_control(sqlite3_file *f, int op, void *arg)
{
    return RM(f)->xFileControl(REAL(f), op, arg);
}
static int shim_sector_size(sqlite3_file *f) { return RM(f)->xSectorSize(REAL(f)); }
static int shim_device_chars(sqlite3_file *f) { return RM(f)->xDeviceCharacteristics(REAL(f)); }
static int shim_shm_map(sqlite3_file *f, int pg, int pgsz, int extend, void volatile **pp)
{
    return RM(f)->xShmMap(REAL(f), pg, pgsz, extend, pp);
}
static int shim_shm_lock(sqlite3_file *f, int off, int n, int flags)
{
    return RM(f)->xShmLock(REAL(f), off, n, flags);
}
static void shim_shm_barrier(sqlite3_file *f) { RM(f)->xShmBarrier(REAL(f)); }
static int shim_shm_unmap(sqlite3_file *f, int del) { return RM(f)->xShmUnmap(REAL(f), del); }
static int shim_fetch(sqlite3_file *f, sqlite3_int64 off, int amt, void **pp)
{
    return RM(f)->xFetch(REAL(f), off, amt, pp);
}
static int shim_unfetch(sqlite3_file *f, sqlite3_int64 off, void *p)
{
    return RM(f)->xUnfetch(REAL(f), off, p);
}

/* ---- gathering files (WAL and main database) --------------------------------- */

/* Writes what is gathered. On failure the bytes stay gathered and the
 * error is returned; the next flush tries again, so writes still reach the
 * file in the order SQLite made them (as with the kernel's own cache). */
static int gather_flush(sqlite3_file *f)
{
    shim_file *sf = (shim_file *)f;
    if (sf->len == 0)
        return SQLITE_OK;
    atomic_fetch_add_explicit(&gather_flushes, 1, memory_order_relaxed);
    int rc = RM(f)->xWrite(REAL(f), sf->gather, (int)sf->len, sf->at);
    if (rc == SQLITE_OK)
        sf->len = 0;
    return rc;
}

static int gather_write(sqlite3_file *f, const void *buf, int amt, sqlite3_int64 off)
{
    shim_file *sf = (shim_file *)f;
    atomic_fetch_add_explicit(&gathered_writes, 1, memory_order_relaxed);
    if (sf->len > 0 && off == sf->at + (sqlite3_int64)sf->len &&
        sf->len + (size_t)amt <= GATHER_MAX) {
        memcpy(sf->gather + sf->len, buf, (size_t)amt);
        sf->len += (size_t)amt;
        return SQLITE_OK;
    }
    int rc = gather_flush(f);
    if (rc != SQLITE_OK)
        return rc;
    if (!sf->gather && (size_t)amt < GATHER_MAX)
        sf->gather = sqlite3_malloc64(GATHER_MAX); /* NULL: write through */
    if (!sf->gather || (size_t)amt >= GATHER_MAX) {
        atomic_fetch_add_explicit(&gather_flushes, 1, memory_order_relaxed);
        return RM(f)->xWrite(REAL(f), buf, amt, off);
    }
    memcpy(sf->gather, buf, (size_t)amt);
    sf->at = off;
    sf->len = (size_t)amt;
    return SQLITE_OK;
}

/* Every other method first writes what is gathered, then forwards. */
#define FLUSHED(call)                                                                             \
    do {                                                                                          \
        int flush_rc_ = gather_flush(f);                                                          \
        return flush_rc_ != SQLITE_OK ? flush_rc_ : (call);                                       \
    } while (0)

static int gather_read(sqlite3_file *f, void *buf, int amt, sqlite3_int64 off)
{
    FLUSHED(shim_read(f, buf, amt, off));
}
static int gather_truncate(sqlite3_file *f, sqlite3_int64 size)
{
    FLUSHED(shim_truncate(f, size));
}
static int gather_sync(sqlite3_file *f, int flags) { FLUSHED(shim_sync(f, flags)); }
static int gather_file_size(sqlite3_file *f, sqlite3_int64 *size)
{
    FLUSHED(shim_file_size(f, size));
}
static int gather_file_control(sqlite3_file *f, int op, void *arg)
{
    FLUSHED(shim_file_control(f, op, arg));
}
static int gather_lock(sqlite3_file *f, int lvl) { FLUSHED(shim_lock(f, lvl)); }
static int gather_unlock(sqlite3_file *f, int lvl) { FLUSHED(shim_unlock(f, lvl)); }
static int gather_shm_map(sqlite3_file *f, int pg, int pgsz, int extend, void volatile **pp)
{
    FLUSHED(shim_shm_map(f, pg, pgsz, extend, pp));
}
static int gather_shm_lock(sqlite3_file *f, int off, int n, int flags)
{
    FLUSHED(shim_shm_lock(f, off, n, flags));
}
/* No error to report here: the sync that precedes every publication in
 * the WAL index has already written everything (see the top). */
static void gather_shm_barrier(sqlite3_file *f)
{
    (void)gather_flush(f);
    shim_shm_barrier(f);
}
static int gather_shm_unmap(sqlite3_file *f, int del) { FLUSHED(shim_shm_unmap(f, del)); }
static int gather_fetch(sqlite3_file *f, sqlite3_int64 off, int amt, void **pp)
{
    FLUSHED(shim_fetch(f, off, amt, pp));
}
static int gather_close(sqlite3_file *f)
{
    shim_file *sf = (shim_file *)f;
    int rc = gather_flush(f);
    sqlite3_free(sf->gather);
    sf->gather = NULL;
    sf->len = 0;
    int crc = shim_close(f);
    return rc != SQLITE_OK ? rc : crc;
}

/* One methods table per io_methods version the real VFS may hand out (the
 * shim must not claim methods the real file does not have), with the
 * methods of prefix p: shim_ forwards, gather_ writes what is gathered
 * first (WAL and main database files). */
#define IO_METHODS(p, ver)                                                                        \
    {                                                                                             \
        .iVersion = (ver), .xClose = p##close, .xRead = p##read, .xWrite = p##write,              \
        .xTruncate = p##truncate, .xSync = p##sync, .xFileSize = p##file_size,                    \
        .xLock = p##lock, .xUnlock = p##unlock, .xCheckReservedLock = shim_check_reserved,        \
        .xFileControl = p##file_control, .xSectorSize = shim_sector_size,                         \
        .xDeviceCharacteristics = shim_device_chars,                                              \
        .xShmMap = (ver) >= 2 ? p##shm_map : NULL, .xShmLock = (ver) >= 2 ? p##shm_lock : NULL,   \
        .xShmBarrier = (ver) >= 2 ? p##shm_barrier : NULL,                                        \
        .xShmUnmap = (ver) >= 2 ? p##shm_unmap : NULL,                                            \
        .xFetch = (ver) >= 3 ? p##fetch : NULL, .xUnfetch = (ver) >= 3 ? shim_unfetch : NULL,     \
    }
static const sqlite3_io_methods shim_methods[4] = {
    IO_METHODS(shim_, 0), IO_METHODS(shim_, 1), IO_METHODS(shim_, 2), IO_METHODS(shim_, 3)};
static const sqlite3_io_methods gather_methods[4] = {
    IO_METHODS(gather_, 0), IO_METHODS(gather_, 1), IO_METHODS(gather_, 2),
    IO_METHODS(gather_, 3)};

static int shim_open(sqlite3_vfs *vfs, sqlite3_filename name, sqlite3_file *f, int flags,
                     int *out_flags)
{
    (void)vfs;
    shim_file *sf = (shim_file *)f;
    sf->real = (sqlite3_file *)(sf + 1);
    sf->base.pMethods = NULL;
    sf->gather = NULL;
    sf->len = 0;
    int rc = root_vfs->xOpen(root_vfs, name, sf->real, flags, out_flags);
    if (sf->real->pMethods) {
        int v = sf->real->pMethods->iVersion;
        v = v < 0 ? 0 : v > 3 ? 3 : v;
        bool gather = flags & (SQLITE_OPEN_WAL | SQLITE_OPEN_MAIN_DB);
        sf->base.pMethods = gather ? &gather_methods[v] : &shim_methods[v];
    }
    return rc;
}

static int shim_delete(sqlite3_vfs *v, const char *name, int sync_dir)
{
    (void)v;
    return root_vfs->xDelete(root_vfs, name, sync_dir);
}
static int shim_access(sqlite3_vfs *v, const char *name, int flags, int *out)
{
    (void)v;
    return root_vfs->xAccess(root_vfs, name, flags, out);
}
static int shim_full_pathname(sqlite3_vfs *v, const char *name, int n, char *out)
{
    (void)v;
    return root_vfs->xFullPathname(root_vfs, name, n, out);
}
static void *shim_dlopen(sqlite3_vfs *v, const char *name)
{
    (void)v;
    return root_vfs->xDlOpen(root_vfs, name);
}
static void shim_dlerror(sqlite3_vfs *v, int n, char *msg)
{
    (void)v;
    root_vfs->xDlError(root_vfs, n, msg);
}
static void (*shim_dlsym(sqlite3_vfs *v, void *h, const char *sym))(void)
{
    (void)v;
    return root_vfs->xDlSym(root_vfs, h, sym);
}
static void shim_dlclose(sqlite3_vfs *v, void *h)
{
    (void)v;
    root_vfs->xDlClose(root_vfs, h);
}
static int shim_randomness(sqlite3_vfs *v, int n, char *out)
{
    (void)v;
    return root_vfs->xRandomness(root_vfs, n, out);
}
static int shim_sleep(sqlite3_vfs *v, int us)
{
    (void)v;
    return root_vfs->xSleep(root_vfs, us);
}
static int shim_current_time(sqlite3_vfs *v, double *out)
{
    (void)v;
    return root_vfs->xCurrentTime(root_vfs, out);
}
static int shim_get_last_error(sqlite3_vfs *v, int n, char *out)
{
    (void)v;
    return root_vfs->xGetLastError ? root_vfs->xGetLastError(root_vfs, n, out) : 0;
}
static int shim_current_time_i64(sqlite3_vfs *v, sqlite3_int64 *out)
{
    (void)v;
    return root_vfs->xCurrentTimeInt64(root_vfs, out);
}
static int shim_set_syscall(sqlite3_vfs *v, const char *name, sqlite3_syscall_ptr p)
{
    (void)v;
    return root_vfs->xSetSystemCall(root_vfs, name, p);
}
static sqlite3_syscall_ptr shim_get_syscall(sqlite3_vfs *v, const char *name)
{
    (void)v;
    return root_vfs->xGetSystemCall(root_vfs, name);
}
static const char *shim_next_syscall(sqlite3_vfs *v, const char *name)
{
    (void)v;
    return root_vfs->xNextSystemCall(root_vfs, name);
}

static pthread_once_t once = PTHREAD_ONCE_INIT;
static int registered;

static void do_register(void)
{
    if (sqlite3_initialize() != SQLITE_OK)
        return;
    root_vfs = sqlite3_vfs_find(NULL);
    if (!root_vfs)
        return;
    shim_vfs = (sqlite3_vfs){
        .iVersion = root_vfs->iVersion < 3 ? root_vfs->iVersion : 3,
        .szOsFile = (int)sizeof(shim_file) + root_vfs->szOsFile,
        .mxPathname = root_vfs->mxPathname,
        .zName = SHIM_NAME,
        .xOpen = shim_open,
        .xDelete = shim_delete,
        .xAccess = shim_access,
        .xFullPathname = shim_full_pathname,
        .xDlOpen = shim_dlopen,
        .xDlError = shim_dlerror,
        .xDlSym = shim_dlsym,
        .xDlClose = shim_dlclose,
        .xRandomness = shim_randomness,
        .xSleep = shim_sleep,
        .xCurrentTime = shim_current_time,
        .xGetLastError = shim_get_last_error,
        .xCurrentTimeInt64 = root_vfs->iVersion >= 2 ? shim_current_time_i64 : NULL,
        .xSetSystemCall = root_vfs->iVersion >= 3 ? shim_set_syscall : NULL,
        .xGetSystemCall = root_vfs->iVersion >= 3 ? shim_get_syscall : NULL,
        .xNextSystemCall = root_vfs->iVersion >= 3 ? shim_next_syscall : NULL,
    };
    registered = sqlite3_vfs_register(&shim_vfs, 0) == SQLITE_OK;
}

const char *fm_sqlite_vfs_name(void)
{
    pthread_once(&once, do_register);
    return registered ? SHIM_NAME : NULL;
}

void sql__vfs_gather_counts(uint64_t *writes, uint64_t *made)
{
    *writes = atomic_load_explicit(&gathered_writes, memory_order_relaxed);
    *made = atomic_load_explicit(&gather_flushes, memory_order_relaxed);
}
