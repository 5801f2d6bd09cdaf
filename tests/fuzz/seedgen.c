/*
 * Writes simulator measurements for the fuzz seed corpus:
 *   fuzz_seedgen <seed> <count>
 * prints <count> viscosity.sweep.v1 documents (one per line) from the same
 * simulated viscometer as `fleetml device run` and synthetic training,
 * dated just before the fixed "now" of fuzz_measurement.c. Used by
 * tests/fuzz/gen-corpus; not a fuzz target.
 */
#include "fleetml/core.h"
#include "fleetml/viscometer.h"

#include <stdio.h>
#include <stdlib.h>

#define FUZZ_NOW_MS 1717243200000LL /* keep in sync with fuzz_measurement.c */

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s SEED COUNT\n", argv[0]);
        return 2;
    }
    fm_rng rng;
    fm_rng_seed(&rng, strtoull(argv[1], NULL, 10));
    int count = atoi(argv[2]);
    for (int i = 0; i < count; i++) {
        fm_visc_truth truth;
        fm_visc_draw_truth(&rng, &truth);
        char id[32];
        snprintf(id, sizeof id, "m-%04d", i + 1);
        char *doc = NULL;
        size_t len = 0;
        if (fm_visc_measurement_json(&rng, &truth, id, "sim-1.0.0",
                                     FUZZ_NOW_MS - (int64_t)(i + 1) * 60000, &doc, &len) != 0)
            return 1;
        fwrite(doc, 1, len, stdout);
        putchar('\n');
        fm_free(doc);
    }
    return 0;
}
