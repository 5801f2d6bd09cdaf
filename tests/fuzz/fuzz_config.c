/*
 * libFuzzer target: configuration parsing (fm_config_parse, INI text from
 * <data>/fleetml.conf). On success the result is rendered and parsed again:
 * what fm_config_render writes must be read back to the same values.
 */
#include "fleetml/config.h"
#include "fuzz_common.h"

static fm_config defaults;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    /* A fixed data directory that does not exist, so nothing depends on
     * the file system (fm_config_defaults keeps it as given). */
    if (fm_config_defaults(&defaults, "/nonexistent/fleetml-fuzz/var") != 0)
        abort();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 64 * 1024)
        return 0; /* config files are small; bigger inputs only slow the fuzzer */
    char *text = fuzz_cstr(data, size);
    fm_config c = defaults;
    fm_errbuf err;
    err.msg[0] = '\0';
    int rc = fm_config_parse(&c, text, &err);
    if (rc == 0) {
        char *out = NULL;
        FUZZ_CHECK(fm_config_render(&c, &out) == 0 && out);
        fm_config c2 = defaults;
        fm_errbuf err2;
        if (fm_config_parse(&c2, out, &err2) != 0) {
            fprintf(stderr, "rendered config does not parse: %s\n--- rendered:\n%s\n", err2.msg,
                    out);
            abort();
        }
        char *out2 = NULL;
        FUZZ_CHECK(fm_config_render(&c2, &out2) == 0 && out2);
        if (strcmp(out, out2) != 0) {
            fprintf(stderr, "render/parse round trip differs\n--- first:\n%s\n--- second:\n%s\n",
                    out, out2);
            abort();
        }
        fm_free(out);
        fm_free(out2);
    } else {
        FUZZ_CHECK(rc == FM_EINVAL);
        FUZZ_CHECK(strnlen(err.msg, sizeof err.msg) < sizeof err.msg);
    }
    free(text);
    return 0;
}
