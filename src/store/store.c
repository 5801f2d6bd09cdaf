#include "fleetml/store.h"
#include "store/store_internal.h"

#include "fleetml/drift.h"

#include <jansson.h>
#include <string.h>

int fm_store_open(const fm_config *cfg, fm_store **out, fm_errbuf *err)
{
    if (strcmp(cfg->store_backend, "sqlite") == 0)
        return store__sqlite_open(cfg, out, err);
    if (strcmp(cfg->store_backend, "postgres") == 0)
        return store__pg_open(cfg, out, err);
    return fm_errf(err, FM_EINVAL, "unknown store backend '%s'", cfg->store_backend);
}

char *store__drift_text(const fm_drift_counts *c)
{
    json_t *a = json_array();
    for (size_t f = 0; a && f < fm_feature_count(); f++)
        for (int b = 0; b < FM_DRIFT_BINS; b++)
            json_array_append_new(a, json_integer((json_int_t)c->counts[f][b]));
    char *t = a ? json_dumps(a, JSON_COMPACT) : NULL;
    json_decref(a);
    return t;
}

void store__drift_read(const char *text, fm_drift_counts *c)
{
    json_t *a = json_loads(text ? text : "[]", 0, NULL);
    size_t nf = fm_feature_count();
    for (size_t i = 0; i < json_array_size(a) && i < nf * FM_DRIFT_BINS; i++)
        c->counts[i / FM_DRIFT_BINS][i % FM_DRIFT_BINS] =
            (uint64_t)json_integer_value(json_array_get(a, i));
    json_decref(a);
}
