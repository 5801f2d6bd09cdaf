/*
 * Internals shared by the function pool (pool.c) and its sandbox
 * (sandbox.c). The pool decides when a worker runs; the sandbox knows how:
 * the bubblewrap command line, the seccomp program and the fork/exec with
 * its rlimits. Nothing here is public API.
 */
#ifndef FLEETML_FUNCTIONS_INT_H
#define FLEETML_FUNCTIONS_INT_H

#include "fleetml/functions.h"

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* 1 when text[0..len) is exactly one valid JSON value, 0 when not,
 * FM_ENOMEM (json_check.cpp, simdjson). */
int fn__json_valid(const char *text, size_t len);

/* The descriptors a worker's bwrap starts with: 0..2 are stdio, then the
 * seccomp program and the file of bwrap's options. The numbers are fixed
 * because the options name them and are built before the fork. */
#define FN__FD_SECCOMP 3
#define FN__FD_OPTIONS 4
#define FN__FD_COUNT 5

/* What every worker of one pool is started with, built once by
 * fn__sandbox_init and only read afterwards (the forked child reads it
 * too, which is why it holds everything exec needs, ready-made). */
typedef struct fn__sandbox {
    char *bwrap;        /* absolute path of the bwrap binary */
    char **argv;        /* bwrap --args 4 -- /fn/<command> args..., NULL-terminated */
    char **envp;        /* bwrap's own environment (not the worker's) */
    char *options;      /* bwrap's options, NUL-separated, read by bwrap from fd 4 */
    size_t options_len;
    void *bpf;          /* the seccomp program (struct sock_filter[]) */
    size_t bpf_len;
    char *log_path;     /* where the worker's stderr is appended; NULL: /dev/null */
    unsigned long long memory_bytes; /* RLIMIT_AS */
    unsigned long long cpu_s;        /* RLIMIT_CPU */
} fn__sandbox;

/* One running worker as the sandbox hands it over: the bwrap launcher's
 * pid (also its process group) and the parent's ends of the worker's
 * stdin (non-blocking) and stdout. All descriptors are O_CLOEXEC. */
typedef struct fn__proc {
    pid_t pid;
    int in_fd;
    int out_fd;
} fn__proc;

/* Builds sb for spec: finds bwrap (FM_EUNAVAIL when it cannot be run),
 * checks the command (FM_ENOTFOUND unless an executable regular file),
 * builds the options and the seccomp program, creates log_dir. On failure
 * sb holds nothing (fn__sandbox_free is still safe). The spec's ranges are
 * the pool's to check. */
int fn__sandbox_init(fn__sandbox *sb, const fm_fn_spec *spec, fm_errbuf *err);
void fn__sandbox_free(fn__sandbox *sb);

/* The bwrap options for spec (everything before "--"), as a NULL-terminated
 * array of fm_strdup'd strings in *out (free with fn__strv_free). The
 * seccomp program is named as descriptor seccomp_fd. Exposed for tests.
 * Returns 0, FM_EINVAL (a malformed env entry) or FM_ENOMEM. */
int fn__bwrap_options(const fm_fn_spec *spec, int seccomp_fd, char ***out, fm_errbuf *err);
void fn__strv_free(char **v);

/* Compiles the seccomp program (default allow; the denials are listed in
 * sandbox.c) and exports it as BPF into *bpf (fm_malloc'd, *len bytes).
 * Returns 0, FM_ENOMEM or FM_EIO. */
int fn__seccomp_export(bool network, void **bpf, size_t *len, fm_errbuf *err);

/* Starts one worker: pipes, the log, fork, rlimits, exec of bwrap. The
 * worker is not ready yet: the pool reads its ready line. Returns 0 with
 * *out filled, or FM_EIO / FM_ENOMEM with nothing left behind. */
int fn__spawn(const fn__sandbox *sb, fn__proc *out, fm_errbuf *err);

/* How many workers a pool should start now (pure, for the tests): up to
 * min_workers; one for each waiting caller no idle or starting worker will
 * serve; and, when hot (a call recently waited too long), one spare beyond
 * the busy workers; never above max_workers in all. */
int fn__workers_wanted(int min_workers, int max_workers, int starting, int idle, int busy,
                       int queued, bool hot);

/* SIGKILLs a worker (its launcher's process group and the launcher). The
 * caller reaps it. pid must not have been reaped yet. */
void fn__kill(pid_t pid);

#ifdef __cplusplus
}
#endif

#endif
