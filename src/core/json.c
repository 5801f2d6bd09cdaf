#include "fleetml/json.h"

json_t *fm_json_str(const char *s)
{
    json_t *j = s ? json_string(s) : NULL;
    return j ? j : json_null();
}

json_t *fm_json_time(int64_t ms)
{
    char buf[40];
    return ms > 0 ? fm_json_str(fm_rfc3339(ms, buf, sizeof buf)) : json_null();
}
