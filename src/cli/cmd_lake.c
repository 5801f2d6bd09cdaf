/* `fleetml lake flush`: exports everything committed to the lake now. */
#include "cli/cli.h"
#include "fleetml/lake.h"

#include <stdio.h>
#include <string.h>

int fm_cmd_lake(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    if (argc != 2 || strcmp(argv[1], "flush") != 0) {
        fprintf(stderr, "usage: fleetml lake flush [--data DIR]\n"
                        "  (run it while `fleetml serve` is stopped; serve exports by itself)\n");
        return 2;
    }
    fm_errbuf err;
    if (fm_lake_export_all(&cfg, &err) != 0) {
        fprintf(stderr, "fleetml lake flush: %s\n", err.msg);
        return 1;
    }
    printf("lake up to date: %s\n", cfg.lake_dir);
    return 0;
}
