/*
 * A fleetml function in C (docs/functions.md): flags a result whose
 * hematocrit is outside a range. Speaks the function protocol: a ready
 * line, then one JSON event per line on stdin, one JSON answer per line on
 * stdout. jansson parses and writes the JSON.
 *
 * Settings come from the environment (function.json "env"): HCT_LOW and
 * HCT_HIGH, in percent.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static double env_num(const char *name, double dflt)
{
    const char *v = getenv(name);
    return v && *v ? strtod(v, NULL) : dflt;
}

int main(void)
{
    double low = env_num("HCT_LOW", 30.0), high = env_num("HCT_HIGH", 55.0);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("{\"ready\":true}\n");
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, stdin) > 0) {
        json_error_t e;
        json_t *req = json_loads(line, 0, &e);
        json_t *id = json_object_get(req, "id");
        json_t *event = json_object_get(req, "event");
        /* The event as the rule's transform made it, or the event itself. */
        json_t *outputs = json_object_get(json_object_get(event, "data"), "outputs");
        json_t *hct = json_object_get(outputs ? outputs : event, "hematocrit_pct");
        json_t *ans;
        if (!json_is_number(hct)) {
            ans = json_pack("{s:O?,s:s}", "id", id, "error", "no hematocrit_pct in the event");
        } else {
            double v = json_number_value(hct);
            ans = json_pack("{s:O?,s:{s:f,s:b,s:s}}", "id", id, "result", "hematocrit_pct", v,
                            "out_of_range", v < low || v > high, "range",
                            v < low ? "low" : v > high ? "high" : "normal");
        }
        char *text = json_dumps(ans, JSON_COMPACT);
        printf("%s\n", text ? text : "{\"error\":\"out of memory\"}");
        free(text);
        json_decref(ans);
        json_decref(req);
    }
    free(line);
    return 0;
}
