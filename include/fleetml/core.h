/*
 * fleetml core: error codes, allocation wrappers, structured logging, time.
 *
 * Error convention: every function that can fail returns int, 0 on success
 * and a negative FM_E* code on failure. Where a caller needs a human message
 * it passes an fm_errbuf it owns; the callee fills it only on failure.
 */
#ifndef FLEETML_CORE_H
#define FLEETML_CORE_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

enum fm_err {
    FM_OK = 0,
    FM_EINVAL = -1,    /* invalid argument or input */
    FM_ENOMEM = -2,    /* allocation failed */
    FM_EIO = -3,       /* file or socket I/O failed (including fsync) */
    FM_ENOTFOUND = -4, /* object does not exist */
    FM_EEXIST = -5,    /* object already exists */
    FM_EPROTO = -6,    /* protocol violation by a peer */
    FM_ECRYPTO = -7,   /* OpenSSL operation failed */
    FM_EDB = -8,       /* database error */
    FM_EBUSY = -9,     /* resource busy, try again */
    FM_ETIMEDOUT = -10,
    FM_ENOSPC = -11,   /* no space left on device */
    FM_EMODEL = -12,   /* model runtime error */
    FM_ERANGE = -13,   /* value out of the accepted range */
    FM_EUNAVAIL = -14, /* dependency unavailable */
    FM_ESTATE = -15,   /* operation not valid in the current state */
    FM_EPERM = -16     /* permission denied */
};

/* FNV-1a over the bytes of s (not its NUL), continuing from h; start with
 * FM_FNV1A_INIT. For in-memory hash tables only: it is not keyed, so a
 * table fed by untrusted keys must bound its probing. */
#define FM_FNV1A_INIT 14695981039346656037ULL
static inline uint64_t fm_fnv1a(uint64_t h, const char *s)
{
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ULL;
    }
    return h;
}

/* Returns a static, never-NULL description of an FM_E* code. */
const char *fm_strerror(int err);

/* Caller-owned buffer for a human-readable error message. */
typedef struct fm_errbuf {
    char msg[512];
} fm_errbuf;

/* Formats a message into err (if err is non-NULL). Returns code unchanged so
 * callers can write `return fm_errf(err, FM_EIO, "...")`. */
int fm_errf(fm_errbuf *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* ---- allocation ---------------------------------------------------------
 * All project allocations go through these wrappers so tests can make the
 * Nth allocation fail. They behave like their libc namesakes; fm_free(NULL)
 * is a no-op. fm_strdup/fm_strndup return NULL on allocation failure. */
void *fm_malloc(size_t n);
void *fm_calloc(size_t nmemb, size_t size);
void *fm_realloc(void *p, size_t n);
void fm_free(void *p);
char *fm_strdup(const char *s);
char *fm_strndup(const char *s, size_t n);
/* Test hook: make the allocation after `n` more successful ones fail
 * (n < 0 disables). Process-wide; not for production use. */
void fm_alloc_fail_after(long n);

/* ---- string building -------------------------------------------------------
 * A growable string. Appends after an allocation failure are ignored and
 * the failure is reported once, by fm_strbuf_take, so builders stay linear.
 * Zero-initialise (`fm_strbuf b = {0};`) before use. */
typedef struct fm_strbuf {
    char *p;
    size_t len, cap;
    int failed;
} fm_strbuf;

/* Appends printf-style output. */
void fm_strbuf_printf(fm_strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends n bytes (any bytes; the buffer stays NUL-terminated after them). */
void fm_strbuf_add(fm_strbuf *b, const void *p, size_t n);
/* Hands the NUL-terminated string to the caller (free with fm_free) and
 * resets b. Returns 0, or FM_ENOMEM (the buffer is freed) when any append
 * failed. len may be NULL. */
int fm_strbuf_take(fm_strbuf *b, char **out, size_t *len);

/* ---- logging -------------------------------------------------------------
 * One JSON object per line on stderr:
 *   {"ts":"2026-11-26T07:00:00.123Z","level":"info","component":"pipeline",
 *    "msg":"...", ...fields}
 * Never pass secrets (keys, passwords, tokens) to the logger. */
enum fm_log_level { FM_LOG_DEBUG = 0, FM_LOG_INFO, FM_LOG_WARN, FM_LOG_ERROR };

void fm_log_set_level(enum fm_log_level lvl);
/* Parses "debug|info|warn|error"; returns FM_EINVAL for anything else. */
int fm_log_level_parse(const char *s, enum fm_log_level *out);
/* Logs msg (printf-style). Thread-safe; each line is written atomically. */
void fm_logf(enum fm_log_level lvl, const char *component, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Logs msg with extra string fields given as key, value pairs ended by NULL:
 *   fm_logkv(FM_LOG_INFO, "broker", "started", "pid", "123", NULL); */
void fm_logkv(enum fm_log_level lvl, const char *component, const char *msg, ...);

/* ---- time ---------------------------------------------------------------- */
/* Monotonic clock in nanoseconds. */
uint64_t fm_mono_ns(void);
/* Wall clock in milliseconds since the Unix epoch (UTC). */
int64_t fm_wall_ms(void);
/* Formats ms-since-epoch as RFC 3339 UTC with milliseconds
 * ("2026-11-26T07:00:00.123Z") into buf (>= 25 bytes). Returns buf. */
char *fm_rfc3339(int64_t ms, char *buf, size_t len);
/* Absolute deadline `ns` nanoseconds from now on the given clock, for
 * pthread_cond_timedwait (CLOCK_MONOTONIC needs a condvar set up with
 * pthread_condattr_setclock). */
struct timespec;
void fm_deadline_ns(struct timespec *ts, int clock_id, int64_t ns);
/* Parses an RFC 3339 date-time (with 'Z' or a numeric offset, optional
 * fraction). Returns 0 and sets *ms, or FM_EINVAL. */
int fm_rfc3339_parse(const char *s, int64_t *ms);

/* ---- files ---------------------------------------------------------------- */
/* Creates dir and its parents with the given mode (existing dirs are left
 * as they are). Returns 0 or FM_EIO. */
int fm_mkdirs(const char *path, unsigned mode);
/* Writes data to path atomically (temp file + fsync + rename + dir fsync)
 * with the given mode. Returns 0, FM_ENOSPC or FM_EIO. */
int fm_write_file_atomic(const char *path, const void *data, size_t len, unsigned mode);
/* Writes all len bytes to fd, retrying short writes and EINTR. Returns 0,
 * FM_ENOSPC or FM_EIO. */
int fm_write_full(int fd, const void *data, size_t len);
/* write(2) with SIGPIPE blocked in the calling thread: writing to a pipe
 * whose reader is gone gives -1 with errno EPIPE, never the signal (a
 * SIGPIPE this write raised is consumed; one already pending stays). For
 * pipes to child processes (hooks, functions) in any program, whether or
 * not it ignores SIGPIPE. */
ssize_t fm_write_nopipe(int fd, const void *buf, size_t len);
/* Reads a whole file into a NUL-terminated buffer the caller frees with
 * fm_free. Returns 0, FM_ENOTFOUND, FM_ENOMEM or FM_EIO. */
int fm_read_file(const char *path, char **out, size_t *len);
/* fsyncs the directory that contains path (or path itself if a dir). */
int fm_fsync_dir(const char *dir);
/* Test hook: when set, the next `n` fsync calls made through fm_fsync_fd fail
 * with EIO. */
int fm_fsync_fd(int fd);
void fm_fsync_fail_next(int n);

#ifdef __cplusplus
}
#endif
#endif
