/* Lookup in the embedded dashboard (see web.h). */
#include "api/web.h"

#include <string.h>

const fm_web_asset *fm_web_find(const char *path)
{
    if (!path)
        return NULL;
    for (const fm_web_asset *a = fm_web_assets; a->path; a++)
        if (strcmp(a->path, path) == 0)
            return a;
    return NULL;
}
