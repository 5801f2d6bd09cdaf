/* `fleetml`: everything is in the command tables (cli.h, help.c). */
#include "cli/cli.h"

int main(int argc, char **argv) { return fm_cli_main(argc, argv); }
