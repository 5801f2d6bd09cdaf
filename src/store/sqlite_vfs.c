/*
 * The "fleetml" SQLite VFS: a pass-through shim over the default (unix)
 * VFS for fault injection, and for one write per WAL frame.
 *
 * Fault injection. Every method forwards to the real VFS / real file;
 * xSync first asks fm_fault_fsync_take() and, when a failure is pending,
 * reports SQLITE_IOERR_FSYNC without syncing -- which is what SQLite's
 * unix VFS reports when fsync(2) fails. With no failure pending the cost
 * is one atomic load per sync.
 *
 * One write per WAL frame. SQLite writes each frame of the log as two
 * writes: its 24-byte header, then the page right after it. On a WAL file
 * the shim keeps such a header back and writes it together with the page
 * when the very next call is the write of the bytes that follow it (one
 * pwrite instead of two: ~2 us less per frame here, docs/performance.md).
 * Any other call on that file first writes the header it holds, so no
 * other call, on this handle or (through the file) on any other, can see
 * the file without it, and the header is never held past the frame it
 * belongs to. A failure of that write is returned by the call that made
 * it, the same error the real VFS would have returned for the header.
 *
 * A shim file is our header followed by the real VFS's file object in the
 * same allocation (szOsFile = ours + theirs); the header's pMethods points
 * at the forwarding methods, and `real` at the embedded real file.
 */
#include "fleetml/fault.h"

#include <pthread.h>
#include <stdbool.h>
#include <sqlite3.h>
#include <stddef.h>
#include <string.h>

#define SHIM_NAME "fleetml"

/* A WAL frame header (WAL_FRAME_HDRSIZE in SQLite) and the WAL file's own
 * header, which comes first in the file. */
#define FRAME_HDR 24
#define WAL_HDR 32
/* The largest page SQLite allows. */
#define MAX_PAGE 65536

typedef struct shim_file {
    sqlite3_file base;  /* must be first: SQLite sees this */
    sqlite3_file *real; /* points just past this struct */
    bool wal;           /* opened as a write-ahead log */
    int held;           /* bytes of a frame header kept back: 0 or FRAME_HDR */
    sqlite3_int64 held_off;
    unsigned char hdr[FRAME_HDR];
    unsigned char *joined; /* header + page, FRAME_HDR + MAX_PAGE bytes (lazily) */
} shim_file;

static sqlite3_vfs shim_vfs;
static sqlite3_vfs *root_vfs;

#define REAL(f) (((shim_file *)(f))->real)
#define RM(f) (REAL(f)->pMethods)

/* Writes the frame header kept back, if any. */
static int flush_held(sqlite3_file *f)
{
    shim_file *sf = (shim_file *)f;
    if (!sf->held)
        return SQLITE_OK;
    sf->held = 0;
    return RM(f)->xWrite(REAL(f), sf->hdr, FRAME_HDR, sf->held_off);
}

/* Every method that can fail and may read, size, sync, lock or close the
 * file writes a held header first. */
#define FLUSH_OR_RETURN(f)                                                                         \
    do {                                                                                           \
        int frc_ = flush_held(f);                                                                  \
        if (frc_ != SQLITE_OK)                                                                     \
            return frc_;                                                                           \
    } while (0)

static int shim_close(sqlite3_file *f)
{
    shim_file *sf = (shim_file *)f;
    int rc = flush_held(f);
    sqlite3_free(sf->joined);
    sf->joined = NULL;
    if (RM(f)) {
        int crc = RM(f)->xClose(REAL(f));
        if (rc == SQLITE_OK)
            rc = crc;
    }
    return rc;
}
static int shim_read(sqlite3_file *f, void *buf, int amt, sqlite3_int64 off)
{
    FLUSH_OR_RETURN(f);
    return RM(f)->xRead(REAL(f), buf, amt, off);
}
static int shim_write(sqlite3_file *f, const void *buf, int amt, sqlite3_int64 off)
{
    shim_file *sf = (shim_file *)f;
    if (sf->held) {
        /* The page right after the header held: one write for both. */
        if (off == sf->held_off + FRAME_HDR && amt > 0 && amt <= MAX_PAGE &&
            (sf->joined || (sf->joined = sqlite3_malloc(FRAME_HDR + MAX_PAGE)) != NULL)) {
            sf->held = 0;
            memcpy(sf->joined, sf->hdr, FRAME_HDR);
            memcpy(sf->joined + FRAME_HDR, buf, (size_t)amt);
            return RM(f)->xWrite(REAL(f), sf->joined, FRAME_HDR + amt, sf->held_off);
        }
        FLUSH_OR_RETURN(f);
    }
    if (sf->wal && amt == FRAME_HDR && off >= WAL_HDR) {
        memcpy(sf->hdr, buf, FRAME_HDR);
        sf->held_off = off;
        sf->held = FRAME_HDR;
        return SQLITE_OK;
    }
    return RM(f)->xWrite(REAL(f), buf, amt, off);
}
static int shim_truncate(sqlite3_file *f, sqlite3_int64 size)
{
    FLUSH_OR_RETURN(f);
    return RM(f)->xTruncate(REAL(f), size);
}
static int shim_sync(sqlite3_file *f, int flags)
{
    FLUSH_OR_RETURN(f);
    if (fm_fault_fsync_take())
        return SQLITE_IOERR_FSYNC;
    return RM(f)->xSync(REAL(f), flags);
}
static int shim_file_size(sqlite3_file *f, sqlite3_int64 *size)
{
    FLUSH_OR_RETURN(f);
    return RM(f)->xFileSize(REAL(f), size);
}
static int shim_lock(sqlite3_file *f, int lvl)
{
    FLUSH_OR_RETURN(f);
    return RM(f)->xLock(REAL(f), lvl);
}
static int shim_unlock(sqlite3_file *f, int lvl)
{
    FLUSH_OR_RETURN(f);
    return RM(f)->xUnlock(REAL(f), lvl);
}
static int shim_check_reserved(sqlite3_file *f, int *out)
{
    FLUSH_OR_RETURN(f);
    return RM(f)->xCheckReservedLock(REAL(f), out);
}
static int shim_file_control(sqlite3_file *f, int op, void *arg)
{
    FLUSH_OR_RETURN(f);
    return RM(f)->xFileControl(REAL(f), op, arg);
}
static int shim_sector_size(sqlite3_file *f) { return RM(f)->xSectorSize(REAL(f)); }
static int shim_device_chars(sqlite3_file *f) { return RM(f)->xDeviceCharacteristics(REAL(f)); }
static int shim_shm_map(sqlite3_file *f, int pg, int pgsz, int extend, void volatile **pp)
{
    FLUSH_OR_RETURN(f);
    return RM(f)->xShmMap(REAL(f), pg, pgsz, extend, pp);
}
static int shim_shm_lock(sqlite3_file *f, int off, int n, int flags)
{
    FLUSH_OR_RETURN(f);
    return RM(f)->xShmLock(REAL(f), off, n, flags);
}
static void shim_shm_barrier(sqlite3_file *f) { RM(f)->xShmBarrier(REAL(f)); }
static int shim_shm_unmap(sqlite3_file *f, int del)
{
    FLUSH_OR_RETURN(f);
    return RM(f)->xShmUnmap(REAL(f), del);
}
static int shim_fetch(sqlite3_file *f, sqlite3_int64 off, int amt, void **pp)
{
    FLUSH_OR_RETURN(f);
    return RM(f)->xFetch(REAL(f), off, amt, pp);
}
static int shim_unfetch(sqlite3_file *f, sqlite3_int64 off, void *p)
{
    return RM(f)->xUnfetch(REAL(f), off, p);
}

/* One methods table per io_methods version the real VFS may hand out; the
 * shim must not claim methods the real file does not have. */
#define SHIM_METHODS(ver)                                                                         \
    {                                                                                             \
        .iVersion = (ver), .xClose = shim_close, .xRead = shim_read, .xWrite = shim_write,        \
        .xTruncate = shim_truncate, .xSync = shim_sync, .xFileSize = shim_file_size,              \
        .xLock = shim_lock, .xUnlock = shim_unlock, .xCheckReservedLock = shim_check_reserved,    \
        .xFileControl = shim_file_control, .xSectorSize = shim_sector_size,                       \
        .xDeviceCharacteristics = shim_device_chars,                                              \
        .xShmMap = (ver) >= 2 ? shim_shm_map : NULL,                                              \
        .xShmLock = (ver) >= 2 ? shim_shm_lock : NULL,                                            \
        .xShmBarrier = (ver) >= 2 ? shim_shm_barrier : NULL,                                      \
        .xShmUnmap = (ver) >= 2 ? shim_shm_unmap : NULL,                                          \
        .xFetch = (ver) >= 3 ? shim_fetch : NULL, .xUnfetch = (ver) >= 3 ? shim_unfetch : NULL,   \
    }
static const sqlite3_io_methods shim_methods[4] = {SHIM_METHODS(0), SHIM_METHODS(1),
                                                    SHIM_METHODS(2), SHIM_METHODS(3)};

static int shim_open(sqlite3_vfs *vfs, sqlite3_filename name, sqlite3_file *f, int flags,
                     int *out_flags)
{
    (void)vfs;
    shim_file *sf = (shim_file *)f;
    sf->real = (sqlite3_file *)(sf + 1);
    sf->base.pMethods = NULL;
    sf->wal = (flags & SQLITE_OPEN_WAL) != 0;
    sf->held = 0;
    sf->joined = NULL;
    int rc = root_vfs->xOpen(root_vfs, name, sf->real, flags, out_flags);
    if (sf->real->pMethods) {
        int v = sf->real->pMethods->iVersion;
        sf->base.pMethods = &shim_methods[v < 0 ? 0 : v > 3 ? 3 : v];
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
