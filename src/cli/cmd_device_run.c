/* Placeholder until the real command lands; replaced by its owner. */
#include "cli/cli.h"
#include <stdio.h>
int fm_cmd_device_run(int argc, char **argv) { (void)argc; (void)argv; fprintf(stderr, "not built yet\n"); return 1; }
