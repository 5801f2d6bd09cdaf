/*
 * Local-directory lake backend. An object is published by renaming the
 * finished spool file to <lake_dir>/<key>; the spool directory is inside
 * lake_dir so source and destination share a filesystem and the rename is
 * atomic: a reader sees either no object or the whole object.
 *
 * Durability: after the rename both directories are fsynced, and so is
 * every directory on the path from the object up to lake_dir, because a
 * freshly created partition directory is itself only an entry in its parent
 * and would vanish in a power loss together with the object inside it. The
 * writer relies on "put returned 0" meaning "the object survives a crash".
 */
#include "lake/lake_int.h"

#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct lake_fs {
    fm_lake base; /* first: fm_lake* and lake_fs* are interchangeable */
    char root[PATH_MAX];
} lake_fs;

/* Keys come from fm_lake_object_key, but the backend does not trust that:
 * an absolute key or a ".." component would write outside the lake. */
static int key_ok(const char *key)
{
    if (!*key || key[0] == '/')
        return 0;
    for (const char *p = key; *p;) {
        const char *e = strchr(p, '/');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        if (n == 0 || (n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.'))
            return 0;
        p += n;
        if (*p == '/')
            p++;
    }
    return 1;
}

static int errno_code(void) { return errno == ENOSPC || errno == EDQUOT ? FM_ENOSPC : FM_EIO; }

static int fs_put(fm_lake *l, const char *key, const char *spool_path, fm_errbuf *err)
{
    lake_fs *fs = (lake_fs *)l;
    char dest[PATH_MAX], dir[PATH_MAX];
    if (!key_ok(key))
        return fm_errf(err, FM_EINVAL, "lake: invalid object key '%s'", key);
    int n = snprintf(dest, sizeof dest, "%s/%s", fs->root, key);
    if (n < 0 || (size_t)n >= sizeof dest)
        return fm_errf(err, FM_EINVAL, "lake: object path too long");
    memcpy(dir, dest, (size_t)n + 1);
    *strrchr(dir, '/') = '\0'; /* key_ok guarantees a '/' after root */

    if (fm_mkdirs(dir, 0755) != 0)
        return fm_errf(err, errno_code(), "lake: cannot create %s: %s", dir, strerror(errno));
    if (rename(spool_path, dest) != 0) {
        int e = errno;
        struct stat st;
        /* Idempotence: a retry after a crash between rename and the
         * caller's bookkeeping finds the spool gone and the object there. */
        if (e == ENOENT && stat(dest, &st) == 0)
            return 0;
        errno = e;
        return fm_errf(err, errno_code(), "lake: rename %s -> %s: %s", spool_path, dest,
                       strerror(e));
    }
    /* Make the new entry durable, then every ancestor up to the root (one
     * of them may have just been created by fm_mkdirs). */
    size_t rootlen = strlen(fs->root);
    for (;;) {
        int rc = fm_fsync_dir(dir);
        if (rc != 0)
            return fm_errf(err, rc, "lake: fsync %s failed", dir);
        if (strlen(dir) <= rootlen)
            break;
        *strrchr(dir, '/') = '\0';
    }
    /* The spool directory lost an entry; syncing it keeps a crash from
     * resurrecting the spool file, which recovery would otherwise re-put
     * (harmless, but wasted work). */
    int rc = fm_fsync_dir(fs->base.spool_dir);
    if (rc != 0)
        return fm_errf(err, rc, "lake: fsync %s failed", fs->base.spool_dir);
    return 0;
}

static int fs_exists(fm_lake *l, const char *key)
{
    lake_fs *fs = (lake_fs *)l;
    char path[PATH_MAX];
    struct stat st;
    if (!key_ok(key))
        return FM_EINVAL;
    int n = snprintf(path, sizeof path, "%s/%s", fs->root, key);
    if (n < 0 || (size_t)n >= sizeof path)
        return FM_EINVAL;
    if (stat(path, &st) == 0)
        return S_ISREG(st.st_mode) ? 1 : 0;
    return errno == ENOENT || errno == ENOTDIR ? 0 : FM_EIO;
}

typedef struct keys {
    char **v;
    size_t n, cap;
} keys;

static int keys_add(keys *k, const char *s)
{
    if (k->n == k->cap) {
        size_t cap = k->cap ? k->cap * 2 : 64;
        char **nv = fm_realloc(k->v, cap * sizeof *nv);
        if (!nv)
            return FM_ENOMEM;
        k->v = nv;
        k->cap = cap;
    }
    return (k->v[k->n] = fm_strdup(s)) ? (k->n++, 0) : FM_ENOMEM;
}

/* Collects the keys of regular files below dir (keys relative to root),
 * leaving out the spool directory. */
static int walk(const char *root, const char *dir, keys *out)
{
    DIR *d = opendir(dir);
    if (!d)
        return 0; /* a prefix nobody wrote to yet */
    struct dirent *e;
    int rc = 0;
    size_t rl = strlen(root);
    while (!rc && (e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0 ||
            strcmp(e->d_name, LAKE__SPOOL_NAME) == 0)
            continue;
        char p[PATH_MAX];
        if ((size_t)snprintf(p, sizeof p, "%s/%s", dir, e->d_name) >= sizeof p)
            continue;
        struct stat st;
        if (lstat(p, &st) != 0)
            continue;
        if (S_ISDIR(st.st_mode))
            rc = walk(root, p, out);
        else if (S_ISREG(st.st_mode))
            rc = keys_add(out, p + rl + 1);
    }
    closedir(d);
    return rc;
}

static int cmp_key(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int fs_list(fm_lake *l, const char *prefix, fm_lake_key_cb cb, void *ud, fm_errbuf *err)
{
    lake_fs *fs = (lake_fs *)l;
    char dir[PATH_MAX];
    /* Walk from the deepest directory the prefix names, filter on the rest. */
    const char *slash = strrchr(prefix, '/');
    int n = slash ? snprintf(dir, sizeof dir, "%s/%.*s", fs->root, (int)(slash - prefix), prefix)
                  : snprintf(dir, sizeof dir, "%s", fs->root);
    if (n < 0 || (size_t)n >= sizeof dir)
        return fm_errf(err, FM_EINVAL, "lake: prefix too long");
    keys k = {0};
    int rc = walk(fs->root, dir, &k);
    if (rc)
        fm_errf(err, rc, "out of memory");
    if (k.n)
        qsort(k.v, k.n, sizeof *k.v, cmp_key);
    size_t pl = strlen(prefix);
    for (size_t i = 0; !rc && i < k.n; i++)
        if (strncmp(k.v[i], prefix, pl) == 0)
            rc = cb(ud, k.v[i]);
    for (size_t i = 0; i < k.n; i++)
        fm_free(k.v[i]);
    fm_free(k.v);
    return rc;
}

static int fs_open_read(fm_lake *l, const char *key, FILE **out, fm_errbuf *err)
{
    lake_fs *fs = (lake_fs *)l;
    char path[PATH_MAX];
    *out = NULL;
    if (!key_ok(key))
        return fm_errf(err, FM_EINVAL, "lake: invalid object key '%s'", key);
    int n = snprintf(path, sizeof path, "%s/%s", fs->root, key);
    if (n < 0 || (size_t)n >= sizeof path)
        return fm_errf(err, FM_EINVAL, "lake: object path too long");
    *out = fopen(path, "rb");
    if (!*out)
        return fm_errf(err, errno == ENOENT ? FM_ENOTFOUND : FM_EIO, "lake: %s: %s", key,
                       strerror(errno));
    return 0;
}

static int fs_remove(fm_lake *l, const char *key, fm_errbuf *err)
{
    lake_fs *fs = (lake_fs *)l;
    char path[PATH_MAX];
    if (!key_ok(key))
        return fm_errf(err, FM_EINVAL, "lake: invalid object key '%s'", key);
    int n = snprintf(path, sizeof path, "%s/%s", fs->root, key);
    if (n < 0 || (size_t)n >= sizeof path)
        return fm_errf(err, FM_EINVAL, "lake: object path too long");
    if (unlink(path) != 0 && errno != ENOENT)
        return fm_errf(err, FM_EIO, "lake: remove %s: %s", key, strerror(errno));
    *strrchr(path, '/') = '\0';
    fm_fsync_dir(path);
    return 0;
}

static void fs_close(fm_lake *l) { fm_free(l); }

static const fm_lake_vtable fs_vtable = {
    .name = "fs",
    .put = fs_put,
    .exists = fs_exists,
    .list = fs_list,
    .open_read = fs_open_read,
    .remove = fs_remove,
    .close = fs_close,
};

int lake__fs_open(const fm_config *cfg, fm_lake **out, fm_errbuf *err)
{
    char root[PATH_MAX];
    const char *dir = cfg->lake_dir;
    int n;
    /* An unset lake dir defaults to <data_dir>/lake. */
    if (dir[0] == '\0')
        n = snprintf(root, sizeof root, "%s/lake", cfg->data_dir);
    else
        n = snprintf(root, sizeof root, "%s", dir);
    if (n <= 0 || (size_t)n + sizeof "/" LAKE__SPOOL_NAME > sizeof root)
        return fm_errf(err, FM_EINVAL, "lake.dir: path empty or too long");
    while (n > 1 && root[n - 1] == '/') /* keep "<root>/<key>" free of "//" */
        root[--n] = '\0';

    lake_fs *fs = fm_calloc(1, sizeof *fs);
    if (!fs)
        return fm_errf(err, FM_ENOMEM, "lake: out of memory");
    fs->base.vt = &fs_vtable;
    memcpy(fs->root, root, (size_t)n + 1);
    /* Length checked above. */
    memcpy(fs->base.spool_dir, root, (size_t)n);
    memcpy(fs->base.spool_dir + n, "/" LAKE__SPOOL_NAME, sizeof "/" LAKE__SPOOL_NAME);
    if (fm_mkdirs(fs->base.spool_dir, 0755) != 0) {
        int e = errno;
        fm_free(fs);
        errno = e;
        return fm_errf(err, FM_EIO, "lake: cannot create %s/%s: %s", root, LAKE__SPOOL_NAME,
                       strerror(e));
    }
    *out = &fs->base;
    return 0;
}
