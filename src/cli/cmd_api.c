/* `fleetml api routes [-v]`: the HTTP API's route table, one route per
 * line ("METHOD /api/v1/path", with -v also the permission it needs), as
 * the server registers it. */
#include "cli/cli.h"
#include "fleetml/api.h"

#include <stdbool.h>
#include <stdio.h>
#include <string.h>

int fm_cmd_api(int argc, char **argv)
{
    bool verbose = argc == 3 && strcmp(argv[2], "-v") == 0;
    if ((argc != 2 && !verbose) || strcmp(argv[1], "routes") != 0) {
        fprintf(stderr, "usage: fleetml api routes [-v]\n");
        return 2;
    }
    for (size_t i = 0; i < fm_api_route_count(); i++) {
        const fm_api_route_info *r = fm_api_route_at(i);
        if (verbose)
            printf("%s %s %s\n", r->method, r->path, r->action ? r->action : "signed-in");
        else
            printf("%s %s\n", r->method, r->path);
    }
    return 0;
}
