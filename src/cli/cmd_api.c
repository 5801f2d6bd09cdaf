/* `fleetml api routes [-v] [--json]`: the HTTP API's route table, one
 * route per line ("METHOD /api/v1/path", with -v also the permission it
 * needs), as the server registers it. */
#include "cli/cli.h"
#include "fleetml/api.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

int fm_cmd_api(int argc, char **argv)
{
    bool verbose = fm_cli_take_flag(&argc, argv, "-v");
    bool as_json = fm_cli_take_flag(&argc, argv, "--json");
    if (argc != 2 || strcmp(argv[1], "routes") != 0)
        return fm_cli_usage_error("api routes", "unexpected argument");
    json_t *all = as_json ? json_array() : NULL;
    for (size_t i = 0; i < fm_api_route_count(); i++) {
        const fm_api_route_info *r = fm_api_route_at(i);
        const char *perm = r->action ? r->action : "signed-in";
        if (all)
            json_array_append_new(all, json_pack("{s:s,s:s,s:s}", "method", r->method, "path",
                                                 r->path, "permission", perm));
        else if (verbose)
            printf("%s %s %s\n", r->method, r->path, perm);
        else
            printf("%s %s\n", r->method, r->path);
    }
    if (all) {
        char *text = json_dumps(all, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        json_decref(all);
        if (!text)
            return 1;
        printf("%s\n", text);
        free(text);
    }
    return 0;
}

const fm_cli_cmd fm_cli_api_cmds[] = {
    {.name = "api", .summary = "the HTTP API as this build serves it"},
    {.name = "api routes",
     .summary = "list the API's routes and the permission each needs",
     .opts = {{"-v", NULL, "also the permission each route needs"},
              {"--json", NULL, "one JSON document: [{method, path, permission}]"}},
     .examples = {"fleetml api routes -v", "fleetml api routes --json | jq '.[].path'"}},
    {.name = NULL},
};
