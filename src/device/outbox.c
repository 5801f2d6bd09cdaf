/*
 * Device outbox: one file per measurement, `<dir>/<measurement id>.json`,
 * holding exactly the payload that is published.
 *
 * Design notes
 *
 * A file is the unit of durability because it makes the two operations the
 * device needs crash-atomic without a log or a database: adding an entry is
 * an atomic write (temp file + fsync + rename + directory fsync), and
 * removing one is unlink() followed by a directory fsync. After a crash the
 * directory holds whole entries only, plus perhaps a temp file
 * (`<id>.json.tmp.<pid>`) from a write that never reached its rename; such
 * leftovers, and anything else that is not `<valid id>.json`, are deleted
 * when the outbox is opened. An empty `.json` file cannot come from an
 * atomic write, so it is treated as damage and deleted too.
 *
 * The in-memory index mirrors the directory in insertion order, so the
 * bounds are checked without touching the disk and "oldest" is cheap.
 * Across restarts the order is recovered from the files' modification
 * times. The kernel stamps files with a coarse clock (one tick, often
 * 4 ms), so entries written in a burst would tie; instead every entry's
 * mtime is set explicitly (futimens, before the fsync that makes it
 * durable) to a strictly increasing nanosecond "logical time": the wall
 * clock, or the previous stamp + 1 ns when the clock has not moved on.
 * Keeping the file content exactly the published payload keeps the outbox
 * easy to inspect and the file name is the id, so no header is needed.
 */
#include "fleetml/device.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define COMPONENT "outbox"
#define SUFFIX ".json"

struct entry {
    char id[FM_DEVICE_MEAS_ID_MAXLEN + 1];
    size_t len;
    int64_t mtime_ns; /* only used to order entries found at open */
};

struct fm_outbox {
    char *dir;
    size_t max_entries, max_bytes;
    enum fm_outbox_policy policy;
    struct entry *v; /* oldest first */
    size_t n, cap;
    size_t bytes;
    int64_t last_stamp_ns; /* highest mtime given or found */
};

static int entry_path(const fm_outbox *ob, const char *id, char *buf, size_t len)
{
    int n = snprintf(buf, len, "%s/%s" SUFFIX, ob->dir, id);
    return n < 0 || (size_t)n >= len ? FM_EINVAL : 0;
}

static ssize_t find(const fm_outbox *ob, const char *id)
{
    for (size_t i = 0; i < ob->n; i++)
        if (strcmp(ob->v[i].id, id) == 0)
            return (ssize_t)i;
    return -1;
}

static int grow(fm_outbox *ob)
{
    if (ob->n < ob->cap)
        return 0;
    size_t cap = ob->cap ? ob->cap * 2 : 16;
    struct entry *v = fm_realloc(ob->v, cap * sizeof *v);
    if (!v)
        return FM_ENOMEM;
    ob->v = v;
    ob->cap = cap;
    return 0;
}

static int cmp_entry(const void *a, const void *b)
{
    const struct entry *x = a, *y = b;
    if (x->mtime_ns != y->mtime_ns)
        return x->mtime_ns < y->mtime_ns ? -1 : 1;
    return strcmp(x->id, y->id);
}

/* Returns the measurement id if name is `<valid id>.json`, else NULL. */
static bool entry_name(const char *name, char *id, size_t idlen)
{
    size_t n = strlen(name), s = strlen(SUFFIX);
    if (n <= s || strcmp(name + n - s, SUFFIX) != 0 || n - s >= idlen)
        return false;
    memcpy(id, name, n - s);
    id[n - s] = '\0';
    return fm_device_measurement_id_valid(id);
}

static void remove_leftover(const fm_outbox *ob, const char *name, const char *why)
{
    char path[PATH_MAX];
    if (snprintf(path, sizeof path, "%s/%s", ob->dir, name) >= (int)sizeof path)
        return;
    if (unlink(path) == 0)
        fm_logkv(FM_LOG_INFO, COMPONENT, "removed leftover file", "path", path, "reason", why,
                 NULL);
}

static int scan(fm_outbox *ob, fm_errbuf *err)
{
    DIR *d = opendir(ob->dir);
    if (!d)
        return fm_errf(err, FM_EIO, "cannot open outbox %s: %s", ob->dir, strerror(errno));
    int rc = 0;
    bool removed = false;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        struct stat st;
        if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode))
            continue; /* not ours to delete */
        char id[FM_DEVICE_MEAS_ID_MAXLEN + 1];
        if (!entry_name(de->d_name, id, sizeof id)) {
            /* Temp files of writes cut short by a crash, or foreign files. */
            remove_leftover(ob, de->d_name, "not an outbox entry (interrupted write?)");
            removed = true;
            continue;
        }
        if (st.st_size == 0) {
            remove_leftover(ob, de->d_name, "empty entry");
            removed = true;
            continue;
        }
        if ((rc = grow(ob)) != 0) {
            fm_errf(err, rc, "outbox %s: out of memory", ob->dir);
            break;
        }
        struct entry *e = &ob->v[ob->n++];
        snprintf(e->id, sizeof e->id, "%s", id);
        e->len = (size_t)st.st_size;
        e->mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
        ob->bytes += e->len;
    }
    closedir(d);
    if (removed)
        (void)fm_fsync_dir(ob->dir);
    if (rc == 0 && ob->n > 1)
        qsort(ob->v, ob->n, sizeof *ob->v, cmp_entry);
    if (ob->n > 0)
        ob->last_stamp_ns = ob->v[ob->n - 1].mtime_ns;
    return rc;
}

int fm_outbox_open(const char *dir, size_t max_entries, size_t max_bytes,
                   enum fm_outbox_policy policy, fm_outbox **out, fm_errbuf *err)
{
    if (!dir || !dir[0] || !out)
        return fm_errf(err, FM_EINVAL, "outbox: directory required");
    if (policy != FM_OUTBOX_REFUSE_NEW && policy != FM_OUTBOX_DROP_OLDEST)
        return fm_errf(err, FM_EINVAL, "outbox: unknown full policy %d", (int)policy);
    if (strlen(dir) + FM_DEVICE_MEAS_ID_MAXLEN + 32 >= PATH_MAX)
        return fm_errf(err, FM_EINVAL, "outbox: directory path too long");
    if (fm_mkdirs(dir, 0700) != 0)
        return fm_errf(err, FM_EIO, "outbox: cannot create %s: %s", dir, strerror(errno));
    fm_outbox *ob = fm_calloc(1, sizeof *ob);
    if (!ob || !(ob->dir = fm_strdup(dir))) {
        fm_free(ob);
        return fm_errf(err, FM_ENOMEM, "outbox: out of memory");
    }
    ob->max_entries = max_entries ? max_entries : FM_OUTBOX_DEFAULT_MAX_ENTRIES;
    ob->max_bytes = max_bytes ? max_bytes : FM_OUTBOX_DEFAULT_MAX_BYTES;
    ob->policy = policy;
    int rc = scan(ob, err);
    if (rc != 0) {
        fm_outbox_close(ob);
        return rc;
    }
    *out = ob;
    return 0;
}

void fm_outbox_close(fm_outbox *ob)
{
    if (!ob)
        return;
    fm_free(ob->v);
    fm_free(ob->dir);
    fm_free(ob);
}

size_t fm_outbox_count(const fm_outbox *ob) { return ob->n; }

size_t fm_outbox_bytes(const fm_outbox *ob) { return ob->bytes; }

bool fm_outbox_contains(const fm_outbox *ob, const char *id) { return find(ob, id) >= 0; }

const char *fm_outbox_dir(const fm_outbox *ob) { return ob->dir; }

int fm_outbox_load(fm_outbox *ob, fm_outbox_entry_fn fn, void *ud)
{
    char path[PATH_MAX];
    for (size_t i = 0; i < ob->n;) {
        char *data = NULL;
        size_t len = 0;
        if (entry_path(ob, ob->v[i].id, path, sizeof path) != 0)
            return FM_EINVAL;
        int rc = fm_read_file(path, &data, &len);
        if (rc == FM_ENOTFOUND || (rc == 0 && len == 0)) {
            /* Deleted behind our back (or emptied): forget it. */
            fm_free(data);
            ob->bytes -= ob->v[i].len;
            memmove(&ob->v[i], &ob->v[i + 1], (ob->n - i - 1) * sizeof *ob->v);
            ob->n--;
            continue;
        }
        if (rc != 0)
            return rc;
        ob->bytes = ob->bytes - ob->v[i].len + len;
        ob->v[i].len = len;
        fn(ud, ob->v[i].id, data, len);
        fm_free(data);
        i++;
    }
    return 0;
}

static int remove_at(fm_outbox *ob, size_t i)
{
    char path[PATH_MAX];
    if (entry_path(ob, ob->v[i].id, path, sizeof path) != 0)
        return FM_EINVAL;
    if (unlink(path) != 0 && errno != ENOENT)
        return FM_EIO;
    ob->bytes -= ob->v[i].len;
    memmove(&ob->v[i], &ob->v[i + 1], (ob->n - i - 1) * sizeof *ob->v);
    ob->n--;
    /* Without this a crash could resurrect the entry; that would only
     * resend it (the cloud dedupes by id), but the result callback would
     * then run a second time. */
    return fm_fsync_dir(ob->dir);
}

int fm_outbox_remove(fm_outbox *ob, const char *id)
{
    ssize_t i = find(ob, id);
    if (i < 0)
        return FM_ENOTFOUND;
    return remove_at(ob, (size_t)i);
}

static int64_t next_stamp(fm_outbox *ob)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t t = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    if (t <= ob->last_stamp_ns)
        t = ob->last_stamp_ns + 1;
    ob->last_stamp_ns = t;
    return t;
}

/* Temp file + mtime stamp + fsync + rename + directory fsync. */
static int write_entry(fm_outbox *ob, const char *path, const void *data, size_t len)
{
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof tmp)
        return FM_EINVAL;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return errno == ENOSPC ? FM_ENOSPC : FM_EIO;
    int rc = fm_write_full(fd, data, len);
    if (rc == 0) {
        int64_t t = next_stamp(ob);
        struct timespec times[2] = {{.tv_sec = t / 1000000000, .tv_nsec = t % 1000000000},
                                    {.tv_sec = t / 1000000000, .tv_nsec = t % 1000000000}};
        if (futimens(fd, times) != 0)
            rc = FM_EIO;
    }
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
    return fm_fsync_dir(ob->dir);
}

static bool over(const fm_outbox *ob, size_t extra_entries, size_t extra_bytes)
{
    return ob->n + extra_entries > ob->max_entries || ob->bytes + extra_bytes > ob->max_bytes;
}

int fm_outbox_put(fm_outbox *ob, const char *id, const void *data, size_t len,
                  fm_outbox_drop_fn on_drop, void *ud)
{
    if (!fm_device_measurement_id_valid(id) || !data || len == 0)
        return FM_EINVAL;
    if (len > ob->max_bytes)
        return FM_ERANGE; /* could never fit, whatever the policy */
    if (find(ob, id) >= 0)
        return FM_EEXIST;
    if (ob->policy == FM_OUTBOX_REFUSE_NEW && over(ob, 1, len))
        return FM_EBUSY;
    int rc = grow(ob);
    if (rc != 0)
        return rc;
    char path[PATH_MAX];
    if ((rc = entry_path(ob, id, path, sizeof path)) != 0)
        return rc;
    rc = write_entry(ob, path, data, len);
    if (rc != 0) {
        /* The rename may have happened before a failing directory fsync;
         * failure must leave nothing queued. */
        (void)unlink(path);
        return rc;
    }
    struct entry *e = &ob->v[ob->n++];
    snprintf(e->id, sizeof e->id, "%s", id);
    e->len = len;
    e->mtime_ns = 0;
    ob->bytes += len;

    /* Drop-oldest makes room only after the new entry is safely on disk, so
     * a failed write never costs an old measurement. */
    while (ob->policy == FM_OUTBOX_DROP_OLDEST && ob->n > 1 && over(ob, 0, 0)) {
        char old[FM_DEVICE_MEAS_ID_MAXLEN + 1];
        snprintf(old, sizeof old, "%s", ob->v[0].id);
        rc = remove_at(ob, 0);
        if (rc != 0 && rc != FM_EIO)
            return 0; /* the new entry is stored; the bound is exceeded for now */
        if (rc == FM_EIO && fm_outbox_contains(ob, old))
            break;
        fm_logkv(FM_LOG_WARN, COMPONENT, "outbox full: dropped oldest measurement", "id", old,
                 NULL);
        if (on_drop)
            on_drop(ud, old);
    }
    return 0;
}
