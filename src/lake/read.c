/*
 * Reading the lake back (fleetml/lake.h, fm_lake_read_area): for training
 * from it, on any backend: the backend's listing of the area, objects in
 * key order, lines of the gzip NDJSON objects (multi-member gzip, as the
 * writer publishes them).
 */
#include "lake/lake_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

/* Reads one object line by line. */
static int read_object(fm_lake *l, const char *key, fm_lake_line_cb cb, void *ud,
                       fm_errbuf *err)
{
    FILE *f;
    int rc = l->vt->open_read(l, key, &f, err);
    if (rc)
        return rc;
    int fd = dup(fileno(f));
    fclose(f);
    gzFile g = fd >= 0 ? gzdopen(fd, "rb") : NULL;
    if (!g) {
        if (fd >= 0)
            close(fd);
        return fm_errf(err, FM_EIO, "lake: cannot open %s", key);
    }
    size_t cap = 64 * 1024, len = 0;
    char *line = fm_malloc(cap);
    rc = line ? 0 : fm_errf(err, FM_ENOMEM, "out of memory");
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
        rc = fm_errf(err, FM_EIO, "lake: %s: %s", key, zmsg);
    gzclose(g);
    fm_free(line);
    return rc;
}

typedef struct key_list {
    char **v;
    size_t n, cap;
} key_list;

static int collect(void *ud, const char *key)
{
    key_list *k = ud;
    size_t l = strlen(key);
    if (l <= 10 || strcmp(key + l - 10, ".ndjson.gz") != 0)
        return 0;
    if (k->n == k->cap) {
        size_t cap = k->cap ? k->cap * 2 : 64;
        char **nv = fm_realloc(k->v, cap * sizeof *nv);
        if (!nv)
            return FM_ENOMEM;
        k->v = nv;
        k->cap = cap;
    }
    return (k->v[k->n] = fm_strdup(key)) ? (k->n++, 0) : FM_ENOMEM;
}

int fm_lake_read_area(const fm_config *cfg, const char *area, const char *tenant,
                      fm_lake_line_cb cb, void *ud, size_t *objects, fm_errbuf *err)
{
    *objects = 0;
    char prefix[512];
    int n;
    if (tenant) {
        /* The partition value as the writer spells it. */
        char part[512];
        if (lake__partition(part, sizeof part, area, tenant, 0) != 0)
            return fm_errf(err, FM_EINVAL, "lake: bad area or tenant");
        n = snprintf(prefix, sizeof prefix, "%.*s/", (int)(strstr(part, "/date=") - part), part);
    } else {
        n = snprintf(prefix, sizeof prefix, "%s/", area);
    }
    if (n < 0 || (size_t)n >= sizeof prefix)
        return fm_errf(err, FM_EINVAL, "lake: area or tenant too long");
    fm_lake *l = NULL;
    int rc = fm_lake_open(cfg, &l, err);
    if (rc)
        return rc;
    /* The listing first, then the objects: each read is a request of its
     * own on S3, and a listing held open would not survive a long read. */
    key_list k = {0};
    rc = l->vt->list(l, prefix, collect, &k, err);
    if (rc == FM_ENOMEM)
        fm_errf(err, rc, "out of memory");
    for (size_t i = 0; !rc && i < k.n; i++) {
        rc = read_object(l, k.v[i], cb, ud, err);
        (*objects)++;
    }
    for (size_t i = 0; i < k.n; i++)
        fm_free(k.v[i]);
    fm_free(k.v);
    fm_lake_close(l);
    return rc;
}
