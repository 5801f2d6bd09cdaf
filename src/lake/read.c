/*
 * Reading the lake back (fleetml/lake.h, fm_lake_read_area): for training
 * from it. The directory backend only; objects in key order, lines of the
 * gzip NDJSON objects (multi-member gzip, as the writer publishes them).
 */
#include "fleetml/lake.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zlib.h>

typedef struct paths {
    char **v;
    size_t n, cap;
} paths;

static int add_path(paths *p, const char *s)
{
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 64;
        char **nv = fm_realloc(p->v, cap * sizeof *nv);
        if (!nv)
            return FM_ENOMEM;
        p->v = nv;
        p->cap = cap;
    }
    return (p->v[p->n] = fm_strdup(s)) ? (p->n++, 0) : FM_ENOMEM;
}

/* Collects every *.ndjson.gz below dir. */
static int walk(const char *dir, paths *out)
{
    DIR *d = opendir(dir);
    if (!d)
        return 0; /* an area nobody wrote to yet */
    struct dirent *e;
    int rc = 0;
    while (!rc && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char p[PATH_MAX];
        if ((size_t)snprintf(p, sizeof p, "%s/%s", dir, e->d_name) >= sizeof p)
            continue;
        struct stat st;
        if (stat(p, &st) != 0)
            continue;
        size_t l = strlen(e->d_name);
        if (S_ISDIR(st.st_mode))
            rc = walk(p, out);
        else if (S_ISREG(st.st_mode) && l > 10 && strcmp(e->d_name + l - 10, ".ndjson.gz") == 0)
            rc = add_path(out, p);
    }
    closedir(d);
    return rc;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Reads one object line by line. */
static int read_object(const char *path, const char *key, fm_lake_line_cb cb, void *ud,
                       fm_errbuf *err)
{
    gzFile g = gzopen(path, "rb");
    if (!g)
        return fm_errf(err, FM_EIO, "lake: cannot open %s", path);
    size_t cap = 64 * 1024, len = 0;
    char *line = fm_malloc(cap);
    int rc = line ? 0 : fm_errf(err, FM_ENOMEM, "out of memory");
    while (!rc) {
        if (!gzgets(g, line + len, (int)(cap - len))) {
            if (len)
                rc = cb(ud, key, line, len);
            break;
        }
        len += strlen(line + len);
        if (len && line[len - 1] == '\n') {
            line[--len] = '\0';
            if (len)
                rc = cb(ud, key, line, len);
            len = 0;
            continue;
        }
        if (len + 1 >= cap) { /* a longer line: grow and read on */
            char *nl = fm_realloc(line, cap * 2);
            if (!nl) {
                rc = fm_errf(err, FM_ENOMEM, "out of memory");
                break;
            }
            line = nl;
            cap *= 2;
        }
    }
    int zerr = 0;
    const char *zmsg = gzerror(g, &zerr);
    if (!rc && zerr != Z_OK && zerr != Z_STREAM_END)
        rc = fm_errf(err, FM_EIO, "lake: %s: %s", path, zmsg);
    gzclose(g);
    fm_free(line);
    return rc;
}

int fm_lake_read_area(const fm_config *cfg, const char *area, const char *tenant,
                      fm_lake_line_cb cb, void *ud, size_t *objects, fm_errbuf *err)
{
    *objects = 0;
    if (strcmp(cfg->lake_backend, "fs") != 0)
        return fm_errf(err, FM_EUNAVAIL, "reading the lake needs lake.backend = fs");
    /* An unset lake dir is <data_dir>/lake, as for the writer. */
    char base[PATH_MAX], root[PATH_MAX + 128];
    int n = cfg->lake_dir[0] ? snprintf(base, sizeof base, "%s", cfg->lake_dir)
                             : snprintf(base, sizeof base, "%s/lake", cfg->data_dir);
    if (n < 0 || (size_t)n >= sizeof base)
        return fm_errf(err, FM_EINVAL, "lake: path too long");
    n = tenant ? snprintf(root, sizeof root, "%s/%s/tenant=%s", base, area, tenant)
               : snprintf(root, sizeof root, "%s/%s", base, area);
    if (n < 0 || (size_t)n >= sizeof root)
        return fm_errf(err, FM_EINVAL, "lake: path too long");
    paths p = {0};
    int rc = walk(root, &p);
    if (rc)
        fm_errf(err, rc, "out of memory");
    if (p.n)
        qsort(p.v, p.n, sizeof *p.v, cmp_str);
    size_t rootlen = strlen(base) + 1;
    for (size_t i = 0; !rc && i < p.n; i++) {
        rc = read_object(p.v[i], p.v[i] + rootlen, cb, ud, err);
        (*objects)++;
    }
    for (size_t i = 0; i < p.n; i++)
        fm_free(p.v[i]);
    fm_free(p.v);
    return rc;
}
