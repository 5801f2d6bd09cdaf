/* `fleetml api routes`: the HTTP API's route table, one route per line
 * ("METHOD /api/v1/path permission"), as the server registers it. */
#include "cli/cli.h"
#include "fleetml/api.h"

#include <stdio.h>
#include <string.h>

int fm_cmd_api(int argc, char **argv)
{
    if (argc != 2 || strcmp(argv[1], "routes") != 0) {
        fprintf(stderr, "usage: fleetml api routes\n");
        return 2;
    }
    for (size_t i = 0; i < fm_api_route_count(); i++) {
        const fm_api_route_info *r = fm_api_route_at(i);
        printf("%s %s %s\n", r->method, r->path, r->action ? r->action : "signed-in");
    }
    return 0;
}
