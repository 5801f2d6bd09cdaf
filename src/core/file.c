#include "fleetml/core.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdatomic.h>
#include <signal.h>
#include <pthread.h>
#include <stdbool.h>
#include <time.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static _Atomic int fsync_failures;

void fm_fsync_fail_next(int n) { atomic_store(&fsync_failures, n); }

int fm_fsync_fd(int fd)
{
    /* Injected failure: report it like the kernel would, and never retry a
     * failed fsync as if it had worked (the page cache may have dropped the
     * dirty pages already). */
    if (atomic_load(&fsync_failures) > 0) {
        atomic_fetch_sub(&fsync_failures, 1);
        errno = EIO;
        return FM_EIO;
    }
    if (fsync(fd) != 0)
        return errno == ENOSPC ? FM_ENOSPC : FM_EIO;
    return 0;
}

int fm_mkdirs(const char *path, unsigned mode)
{
    char buf[PATH_MAX];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf)
        return FM_EINVAL;
    memcpy(buf, path, n + 1);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(buf, mode) != 0 && errno != EEXIST)
            return FM_EIO;
        *p = '/';
    }
    if (mkdir(buf, mode) != 0 && errno != EEXIST)
        return FM_EIO;
    return 0;
}

int fm_fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return FM_EIO;
    int rc = fm_fsync_fd(fd);
    close(fd);
    return rc;
}

int fm_write_full(int fd, const void *data, size_t len)
{
    const char *p = data;
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno == ENOSPC ? FM_ENOSPC : FM_EIO;
        }
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

int fm_write_file_atomic(const char *path, const void *data, size_t len, unsigned mode)
{
    char tmp[PATH_MAX], dir[PATH_MAX];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof tmp)
        return FM_EINVAL;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (fd < 0)
        return errno == ENOSPC ? FM_ENOSPC : FM_EIO;
    /* open() applies the umask; set the exact mode (keys must be 0600). */
    int rc = fchmod(fd, mode) == 0 ? 0 : FM_EIO;
    if (rc == 0)
        rc = fm_write_full(fd, data, len);
    if (rc == 0)
        rc = fm_fsync_fd(fd);
    if (close(fd) != 0 && rc == 0)
        rc = FM_EIO;
    if (rc == 0 && rename(tmp, path) != 0)
        rc = FM_EIO;
    if (rc != 0) {
        unlink(tmp);
        return rc;
    }
    snprintf(dir, sizeof dir, "%s", path);
    return fm_fsync_dir(dirname(dir));
}

int fm_read_file(const char *path, char **out, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return errno == ENOENT ? FM_ENOTFOUND : FM_EIO;
    size_t cap = 4096, n = 0;
    char *buf = fm_malloc(cap);
    if (!buf) {
        fclose(f);
        return FM_ENOMEM;
    }
    for (;;) {
        if (n + 1 >= cap) {
            char *nb = fm_realloc(buf, cap * 2);
            if (!nb) {
                fm_free(buf);
                fclose(f);
                return FM_ENOMEM;
            }
            buf = nb;
            cap *= 2;
        }
        size_t r = fread(buf + n, 1, cap - n - 1, f);
        n += r;
        if (r == 0)
            break;
    }
    int err = ferror(f);
    fclose(f);
    if (err) {
        fm_free(buf);
        return FM_EIO;
    }
    buf[n] = '\0';
    *out = buf;
    if (len)
        *len = n;
    return 0;
}

ssize_t fm_write_nopipe(int fd, const void *buf, size_t len)
{
    sigset_t pipe_set, old, pending;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    bool was_pending = sigpending(&pending) == 0 && sigismember(&pending, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
    ssize_t n = write(fd, buf, len);
    int saved = errno;
    if (n < 0 && saved == EPIPE && !was_pending) {
        static const struct timespec zero = {0, 0};
        while (sigtimedwait(&pipe_set, NULL, &zero) < 0 && errno == EINTR)
            ;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    errno = saved;
    return n;
}
