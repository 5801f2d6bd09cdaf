#include "fleetml/store.h"
#include "store/store_internal.h"

#include <string.h>

int fm_store_open(const fm_config *cfg, fm_store **out, fm_errbuf *err)
{
    if (strcmp(cfg->store_backend, "sqlite") == 0)
        return store__sqlite_open(cfg, out, err);
    if (strcmp(cfg->store_backend, "postgres") == 0)
        return store__pg_open(cfg, out, err);
    return fm_errf(err, FM_EINVAL, "unknown store backend '%s'", cfg->store_backend);
}
