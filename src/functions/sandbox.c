/*
 * How a function's worker is started: bubblewrap (bwrap) for the file
 * system, namespaces and user; a seccomp program for the system calls
 * namespaces do not cover; rlimits for memory, CPU, files and processes.
 *
 * bwrap gets its options through a descriptor (--args 4) rather than on
 * its command line: the options carry the function's environment, secrets
 * included, and a command line is readable by every user of the host in
 * /proc/<pid>/cmdline for as long as the worker lives. `ps` shows only
 * "bwrap --args 4 -- /fn/<command>".
 *
 * What holds, and what does not (fleetml usually runs as root):
 *  - The worker is uid/gid 65534 in a new user namespace, mapped to the
 *    uid that runs fleetml, with no capabilities. When that uid is root,
 *    files owned by root are the worker's own as far as permission bits
 *    go; isolation then rests on what is mounted (only /usr and /fn, both
 *    read-only, a private /tmp, /proc and a minimal /dev) and on seccomp,
 *    not on the uid.
 *  - RLIMIT_NPROC counts tasks per real uid on the host. For a worker of a
 *    root fleetml that uid is root's, which the kernel exempts from the
 *    limit: it does not hold then. For a non-root fleetml it holds, and
 *    counts fleetml's own threads and every worker of that uid too.
 *  - RLIMIT_AS and RLIMIT_CPU bind bwrap and everything it starts; each
 *    process counts its own CPU seconds from zero, so cpu_s bounds the
 *    worker's life, after which SIGXCPU ends it (and the pool replaces it).
 *  - The seccomp program holds for the worker and all its descendants
 *    (bwrap applies it just before exec, with no_new_privs). System calls
 *    of a foreign ABI (i386 on x86-64) kill the process (libseccomp's
 *    default for a wrong architecture), so socketcall cannot bypass it.
 */
#include "functions/functions_int.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <seccomp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

/* The sandbox's user (nobody) and the file-descriptor limit of a worker. */
#define SANDBOX_ID "65534"
#define WORKER_NOFILE 256
#define WORKER_NPROC 64

/* ---- string vectors ------------------------------------------------------- */

typedef struct strv {
    char **v;
    size_t n, cap;
    bool failed;
} strv;

/* Appends a copy of s (or of its first len bytes when len != (size_t)-1).
 * A failure is remembered and reported once by the builder. */
static void strv_addn(strv *s, const char *str, size_t len)
{
    if (s->failed)
        return;
    if (s->n + 2 > s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 32;
        char **v = fm_realloc(s->v, cap * sizeof *v);
        if (!v) {
            s->failed = true;
            return;
        }
        s->v = v;
        s->v[s->n] = NULL; /* terminated even if the copy below fails */
        s->cap = cap;
    }
    char *copy = len == (size_t)-1 ? fm_strdup(str) : fm_strndup(str, len);
    if (!copy) {
        s->failed = true;
        return;
    }
    s->v[s->n++] = copy;
    s->v[s->n] = NULL;
}

static void strv_add(strv *s, const char *str) { strv_addn(s, str, (size_t)-1); }

void fn__strv_free(char **v)
{
    for (size_t i = 0; v && v[i]; i++)
        fm_free(v[i]);
    fm_free(v);
}

/* ---- bwrap's options ------------------------------------------------------ */

int fn__bwrap_options(const fm_fn_spec *spec, int seccomp_fd, char ***out, fm_errbuf *err)
{
    *out = NULL;
    const char *slash = strrchr(spec->command, '/');
    if (!slash || !slash[1])
        return fm_errf(err, FM_EINVAL, "function %s: command must be an absolute file path",
                       spec->name);
    strv o = {0};
    strv_add(&o, "--unshare-all");
    if (spec->network)
        strv_add(&o, "--share-net");
    const char *const fixed[] = {
        "--die-with-parent", "--new-session", "--uid", SANDBOX_ID, "--gid", SANDBOX_ID,
        "--ro-bind", "/usr", "/usr",
        "--symlink", "usr/bin", "/bin",
        "--symlink", "usr/lib", "/lib",
        "--symlink", "usr/lib64", "/lib64",
        "--symlink", "usr/sbin", "/sbin",
    };
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++)
        strv_add(&o, fixed[i]);
    /* The function's directory, read-only at /fn ("/" for a command at the
     * root, which nobody should do but which still means what it says). */
    strv_add(&o, "--ro-bind");
    strv_addn(&o, spec->command, slash == spec->command ? 1 : (size_t)(slash - spec->command));
    strv_add(&o, "/fn");
    const char *const rest[] = {
        "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev", "--chdir", "/tmp",
        "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
    };
    for (size_t i = 0; i < sizeof rest / sizeof rest[0]; i++)
        strv_add(&o, rest[i]);
    for (size_t i = 0; i < FM_FN_ENV_MAX && spec->env[i]; i++) {
        const char *eq = strchr(spec->env[i], '=');
        if (!eq || eq == spec->env[i]) {
            fn__strv_free(o.v);
            /* The entry itself may be a secret: name its position only. */
            return fm_errf(err, FM_EINVAL, "function %s: env[%zu] is not NAME=value", spec->name,
                           i);
        }
        strv_add(&o, "--setenv");
        strv_addn(&o, spec->env[i], (size_t)(eq - spec->env[i]));
        strv_add(&o, eq + 1);
    }
    if (spec->network) {
        /* Name resolution and TLS need these; absent ones are skipped. */
        const char *const net[] = {"/etc/resolv.conf", "/etc/hosts", "/etc/ssl",
                                   "/etc/ca-certificates"};
        for (size_t i = 0; i < sizeof net / sizeof net[0]; i++) {
            strv_add(&o, "--ro-bind-try");
            strv_add(&o, net[i]);
            strv_add(&o, net[i]);
        }
    }
    char fdtxt[16];
    snprintf(fdtxt, sizeof fdtxt, "%d", seccomp_fd);
    strv_add(&o, "--seccomp");
    strv_add(&o, fdtxt);
    if (o.failed) {
        fn__strv_free(o.v);
        return fm_errf(err, FM_ENOMEM, "out of memory");
    }
    *out = o.v;
    return 0;
}

/* ---- seccomp ------------------------------------------------------------------ */

/* Refused with EPERM whatever the settings: debugging and reading other
 * processes, mounting and namespaces (escape routes out of bwrap's view),
 * kernel keyrings, eBPF, perf, userfaultfd (a classic exploit primitive),
 * module loading, kexec, reboot and swap. io_uring is refused too: its
 * operations (IORING_OP_SOCKET among them) are not system calls, so
 * seccomp would never see them. open_by_handle_at reaches files outside
 * the mounts given to the sandbox. */
static const char *const denied_syscalls[] = {
    "ptrace",        "process_vm_readv", "process_vm_writev", "mount",
    "umount2",       "pivot_root",       "unshare",           "setns",
    "keyctl",        "add_key",          "request_key",       "bpf",
    "perf_event_open", "userfaultfd",    "kexec_load",        "kexec_file_load",
    "init_module",   "finit_module",     "delete_module",     "reboot",
    "swapon",        "swapoff",          "io_uring_setup",    "io_uring_enter",
    "io_uring_register", "open_by_handle_at",
};

/* clone() flags that make new namespaces: refused like unshare(). */
static const unsigned long clone_ns_flags[] = {
    CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWPID,
    CLONE_NEWIPC,  CLONE_NEWUTS, CLONE_NEWCGROUP,
};

static int build_filter(scmp_filter_ctx ctx, bool network)
{
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < sizeof denied_syscalls / sizeof denied_syscalls[0]; i++) {
        int nr = seccomp_syscall_resolve_name(denied_syscalls[i]);
        if (nr == __NR_SCMP_ERROR) /* not a system call of this architecture */
            continue;
        rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), nr, 0);
    }
    /* clone's flags are its first argument on x86-64 and arm64 (not on
     * s390, where this rule would test the stack pointer instead). */
    for (size_t i = 0; rc == 0 && i < sizeof clone_ns_flags / sizeof clone_ns_flags[0]; i++)
        rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(clone), 1,
                              SCMP_A0(SCMP_CMP_MASKED_EQ, clone_ns_flags[i], clone_ns_flags[i]));
    /* clone3 passes its flags in memory, out of seccomp's sight. ENOSYS
     * (not EPERM) makes glibc fall back to clone, which the rules above
     * check; threads and posix_spawn keep working. */
    if (rc == 0)
        rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0);
    /* Without network, every socket family but AF_UNIX is refused. The
     * worker's network namespace has only a loopback already; this keeps
     * it from even that, and from netlink and raw packet sockets. */
    if (rc == 0 && !network)
        rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EACCES), SCMP_SYS(socket), 1,
                              SCMP_A0(SCMP_CMP_NE, AF_UNIX));
    return rc;
}

int fn__seccomp_export(bool network, void **bpf, size_t *len, fm_errbuf *err)
{
    *bpf = NULL;
    *len = 0;
    int fd = -1, rc = 0;
    void *buf = NULL;
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
    if (!ctx)
        return fm_errf(err, FM_ENOMEM, "seccomp: cannot create a filter");
    int src = build_filter(ctx, network);
    if (src != 0) {
        rc = fm_errf(err, FM_EIO, "seccomp: adding a rule: %s", strerror(-src));
        goto out;
    }
    /* libseccomp 2.5 exports only to a descriptor. */
    fd = memfd_create("fleetml-seccomp", MFD_CLOEXEC);
    if (fd < 0) {
        rc = fm_errf(err, FM_EIO, "seccomp: memfd_create: %s", strerror(errno));
        goto out;
    }
    src = seccomp_export_bpf(ctx, fd);
    off_t size = src == 0 ? lseek(fd, 0, SEEK_END) : -1;
    if (size <= 0 || size % 8 != 0 || lseek(fd, 0, SEEK_SET) != 0) {
        rc = fm_errf(err, FM_EIO, "seccomp: exporting the program failed");
        goto out;
    }
    buf = fm_malloc((size_t)size);
    if (!buf) {
        rc = fm_errf(err, FM_ENOMEM, "out of memory");
        goto out;
    }
    for (size_t got = 0; got < (size_t)size;) {
        ssize_t r = read(fd, (char *)buf + got, (size_t)size - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            rc = fm_errf(err, FM_EIO, "seccomp: reading the program back failed");
            goto out;
        }
        got += (size_t)r;
    }
    *bpf = buf;
    *len = (size_t)size;
    buf = NULL;
out:
    fm_free(buf);
    if (fd >= 0)
        close(fd);
    seccomp_release(ctx);
    return rc;
}

/* ---- the sandbox of a pool ------------------------------------------------------ */

/* Finds bwrap: name as given when it holds a '/', else along PATH. */
static int find_bwrap(const char *name, char **out, fm_errbuf *err)
{
    if (!name)
        name = "bwrap";
    if (strchr(name, '/')) {
        if (access(name, X_OK) != 0)
            return fm_errf(err, FM_EUNAVAIL, "bwrap cannot be run: %s: %s", name,
                           strerror(errno));
        *out = fm_strdup(name);
        return *out ? 0 : fm_errf(err, FM_ENOMEM, "out of memory");
    }
    const char *path = getenv("PATH");
    if (!path || !*path)
        path = "/usr/local/bin:/usr/bin:/bin";
    char cand[4096];
    for (const char *p = path; *p;) {
        const char *end = strchr(p, ':');
        size_t dlen = end ? (size_t)(end - p) : strlen(p);
        int n = snprintf(cand, sizeof cand, "%.*s/%s", (int)dlen, dlen ? p : ".", name);
        if (n > 0 && (size_t)n < sizeof cand && access(cand, X_OK) == 0) {
            *out = fm_strdup(cand);
            return *out ? 0 : fm_errf(err, FM_ENOMEM, "out of memory");
        }
        p += dlen + (end ? 1 : 0);
    }
    return fm_errf(err, FM_EUNAVAIL, "bwrap cannot be run: %s is not in PATH", name);
}

/* The options as bwrap's --args reads them: each one ended by a NUL. */
static int join_options(char **opts, char **out, size_t *len)
{
    size_t n = 0;
    for (size_t i = 0; opts[i]; i++)
        n += strlen(opts[i]) + 1;
    char *buf = fm_malloc(n);
    if (!buf)
        return FM_ENOMEM;
    size_t off = 0;
    for (size_t i = 0; opts[i]; i++) {
        size_t l = strlen(opts[i]) + 1;
        memcpy(buf + off, opts[i], l);
        off += l;
    }
    *out = buf;
    *len = n;
    return 0;
}

int fn__sandbox_init(fn__sandbox *sb, const fm_fn_spec *spec, fm_errbuf *err)
{
    memset(sb, 0, sizeof *sb);
    char **opts = NULL;
    strv argv = {0}, envp = {0};
    struct stat st;
    int rc;
    if (stat(spec->command, &st) != 0 || !S_ISREG(st.st_mode) || access(spec->command, X_OK) != 0)
        return fm_errf(err, FM_ENOTFOUND, "function %s: %s is not an executable file",
                       spec->name, spec->command);
    rc = find_bwrap(spec->bwrap, &sb->bwrap, err);
    if (rc)
        goto fail;
    rc = fn__bwrap_options(spec, FN__FD_SECCOMP, &opts, err);
    if (rc)
        goto fail;
    if (join_options(opts, &sb->options, &sb->options_len) != 0) {
        rc = fm_errf(err, FM_ENOMEM, "out of memory");
        goto fail;
    }
    char fdtxt[16];
    snprintf(fdtxt, sizeof fdtxt, "%d", FN__FD_OPTIONS);
    strv_add(&argv, "bwrap");
    strv_add(&argv, "--args");
    strv_add(&argv, fdtxt);
    strv_add(&argv, "--");
    /* The command as the sandbox sees it: its directory is /fn. */
    const char *base = strrchr(spec->command, '/') + 1;
    size_t ilen = strlen(base) + sizeof "/fn/";
    char *inner = fm_malloc(ilen);
    if (inner) {
        snprintf(inner, ilen, "/fn/%s", base);
        strv_add(&argv, inner);
        fm_free(inner);
    } else {
        argv.failed = true;
    }
    for (size_t i = 0; i < sizeof spec->args / sizeof spec->args[0] && spec->args[i]; i++)
        strv_add(&argv, spec->args[i]);
    /* bwrap's own environment: --clearenv gives the worker a fresh one, so
     * nothing of fleetml's (tokens in its environment, say) passes on. */
    strv_add(&envp, "PATH=/usr/bin:/bin");
    if (argv.failed || envp.failed) {
        rc = fm_errf(err, FM_ENOMEM, "out of memory");
        goto fail;
    }
    sb->argv = argv.v;
    sb->envp = envp.v;
    argv.v = envp.v = NULL;
    rc = fn__seccomp_export(spec->network, &sb->bpf, &sb->bpf_len, err);
    if (rc)
        goto fail;
    if (spec->log_dir) {
        if (fm_mkdirs(spec->log_dir, 0750) != 0) {
            rc = fm_errf(err, FM_EIO, "function %s: cannot create %s: %s", spec->name,
                         spec->log_dir, strerror(errno));
            goto fail;
        }
        size_t plen = strlen(spec->log_dir) + strlen(spec->name) + sizeof "/.log";
        sb->log_path = fm_malloc(plen);
        if (!sb->log_path) {
            rc = fm_errf(err, FM_ENOMEM, "out of memory");
            goto fail;
        }
        snprintf(sb->log_path, plen, "%s/%s.log", spec->log_dir, spec->name);
    }
    sb->memory_bytes = (unsigned long long)spec->memory_mb * 1024 * 1024;
    sb->cpu_s = (unsigned long long)spec->cpu_s;
    fn__strv_free(opts);
    return 0;
fail:
    fn__strv_free(opts);
    fn__strv_free(argv.v);
    fn__strv_free(envp.v);
    fn__sandbox_free(sb);
    return rc;
}

void fn__sandbox_free(fn__sandbox *sb)
{
    if (!sb)
        return;
    fm_free(sb->bwrap);
    fn__strv_free(sb->argv);
    fn__strv_free(sb->envp);
    fm_free(sb->options);
    fm_free(sb->bpf);
    fm_free(sb->log_path);
    memset(sb, 0, sizeof *sb);
}

/* ---- starting a worker ---------------------------------------------------------- */

/* A memfd holding data, its offset back at 0. Each worker gets its own:
 * bwrap reads from the descriptor's current offset, and that offset is
 * shared by every process holding the same open file. */
static int memfd_with(const char *name, const void *data, size_t len)
{
    int fd = memfd_create(name, MFD_CLOEXEC);
    if (fd < 0)
        return -1;
    if (fm_write_full(fd, data, len) != 0 || lseek(fd, 0, SEEK_SET) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void close_if(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

/* The child between fork and exec. Another thread of fleetml may have held
 * any lock (malloc's included) at the moment of the fork, so only
 * async-signal-safe calls from here on (setrlimit and close_range are
 * plain system calls, if not on POSIX's list), and everything exec needs
 * was built before the fork. fds: stdin, stdout, stderr, seccomp program,
 * options, in that order. */
static _Noreturn void child_exec(const fn__sandbox *sb, int fds[FN__FD_COUNT])
{
    static const char msg[] = "fleetml: cannot start bwrap for a function worker\n";
    /* Caught signals are reset by exec, ignored ones are not: a worker
     * must not inherit fleetml's SIGPIPE = SIG_IGN, say. */
    for (int s = 1; s < NSIG; s++) {
        struct sigaction old;
        if (s == SIGKILL || s == SIGSTOP || sigaction(s, NULL, &old) != 0)
            continue;
        if (old.sa_handler == SIG_IGN) {
            struct sigaction dfl;
            memset(&dfl, 0, sizeof dfl);
            dfl.sa_handler = SIG_DFL;
            sigaction(s, &dfl, NULL);
        }
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    /* Its own process group, so a kill reaches the launcher without
     * touching fleetml (bwrap's --new-session moves the sandbox itself into
     * a session of its own). */
    setpgid(0, 0);
    /* Move the descriptors out of the way of 0..4 before placing them
     * there, whatever numbers they happen to have. */
    for (int i = 0; i < FN__FD_COUNT; i++) {
        if (fds[i] < FN__FD_COUNT) {
            fds[i] = fcntl(fds[i], F_DUPFD, FN__FD_COUNT);
            if (fds[i] < 0)
                goto fail;
        }
    }
    for (int i = 0; i < FN__FD_COUNT; i++) /* dup2 clears FD_CLOEXEC on the copy */
        if (dup2(fds[i], i) < 0)
            goto fail;
    if (close_range(FN__FD_COUNT, ~0U, 0) != 0)
        for (int fd = FN__FD_COUNT; fd < 65536; fd++)
            close(fd);
    struct rlimit rl;
    rl.rlim_cur = rl.rlim_max = 0;
    setrlimit(RLIMIT_CORE, &rl);
    rl.rlim_cur = rl.rlim_max = WORKER_NOFILE;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        goto fail;
    rl.rlim_cur = rl.rlim_max = WORKER_NPROC;
    if (setrlimit(RLIMIT_NPROC, &rl) != 0)
        goto fail;
    rl.rlim_cur = rl.rlim_max = sb->cpu_s;
    if (setrlimit(RLIMIT_CPU, &rl) != 0)
        goto fail;
    /* Last: from here on the address space is bounded (this process's is
     * already larger, which only stops it growing until exec replaces it). */
    rl.rlim_cur = rl.rlim_max = sb->memory_bytes;
    if (setrlimit(RLIMIT_AS, &rl) != 0)
        goto fail;
    execve(sb->bwrap, sb->argv, sb->envp);
fail:
    (void)!write(STDERR_FILENO, msg, sizeof msg - 1);
    _exit(127);
}

int fn__spawn(const fn__sandbox *sb, fn__proc *out, fm_errbuf *err)
{
    int in[2] = {-1, -1}, outp[2] = {-1, -1}, logfd = -1, bpffd = -1, optfd = -1, rc = 0;
    out->pid = -1;
    out->in_fd = out->out_fd = -1;
    if (pipe2(in, O_CLOEXEC) != 0 || pipe2(outp, O_CLOEXEC) != 0) {
        rc = fm_errf(err, FM_EIO, "pipe: %s", strerror(errno));
        goto out;
    }
    /* Opened for each worker, so a rotated log is picked up by the next
     * one. O_APPEND keeps the lines of several workers whole. */
    logfd = sb->log_path
                ? open(sb->log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640)
                : open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (logfd < 0) {
        rc = fm_errf(err, FM_EIO, "%s: %s", sb->log_path ? sb->log_path : "/dev/null",
                     strerror(errno));
        goto out;
    }
    bpffd = memfd_with("fleetml-seccomp", sb->bpf, sb->bpf_len);
    optfd = memfd_with("fleetml-bwrap-args", sb->options, sb->options_len);
    if (bpffd < 0 || optfd < 0) {
        rc = fm_errf(err, FM_EIO, "memfd: %s", strerror(errno));
        goto out;
    }
    pid_t pid = fork();
    if (pid == 0) {
        int fds[FN__FD_COUNT] = {in[0], outp[1], logfd, bpffd, optfd};
        child_exec(sb, fds);
    }
    if (pid < 0) {
        rc = fm_errf(err, FM_EIO, "fork: %s", strerror(errno));
        goto out;
    }
    /* Also here, so that the group exists before fn__kill can be called,
     * whichever of the two runs first. */
    setpgid(pid, pid);
    /* The parent writes requests without blocking past a call's deadline
     * on a worker that stopped reading. */
    int fl = fcntl(in[1], F_GETFL);
    if (fl >= 0)
        fcntl(in[1], F_SETFL, fl | O_NONBLOCK);
    out->pid = pid;
    out->in_fd = in[1];
    out->out_fd = outp[0];
    in[1] = outp[0] = -1;
out:
    close_if(&in[0]);
    close_if(&in[1]);
    close_if(&outp[0]);
    close_if(&outp[1]);
    close_if(&logfd);
    close_if(&bpffd);
    close_if(&optfd);
    return rc;
}

void fn__kill(pid_t pid)
{
    if (pid <= 0)
        return;
    /* The group holds the launcher; the sandbox (its own session) dies with
     * it through bwrap's --die-with-parent, and with the sandbox's pid 1
     * every process of its pid namespace. */
    kill(-pid, SIGKILL);
    kill(pid, SIGKILL);
}
