/*
 * libFuzzer target: fm_csr_parse (src/pki/pki.c) on raw bytes, i.e. the
 * csr field of a provisioning or rotation request after JSON unescaping.
 * Checks that a refusal always carries one of the contract's codes and
 * leaves *out NULL.
 */
#include "fleetml/pki.h"
#include "fuzz_common.h"

#include <openssl/err.h>

static const char *const CODES[] = {FM_CSR_INVALID, FM_CSR_BAD_SIGNATURE, FM_CSR_WEAK_KEY,
                                    FM_CSR_CA_NOT_ALLOWED, "internal", NULL};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *pem = fuzz_bytes(data, size);
    fm_csr *csr = (fm_csr *)&csr; /* must be reset to NULL on refusal */
    char code[32];
    fm_errbuf err;
    memset(code, 'x', sizeof code);
    int rc = fm_csr_parse(pem, size, &csr, code, &err);
    if (rc == 0) {
        FUZZ_CHECK(csr != NULL && code[0] == '\0');
        fm_csr_free(csr);
    } else {
        FUZZ_CHECK(csr == NULL);
        int known = 0;
        for (int i = 0; CODES[i]; i++)
            known |= strcmp(code, CODES[i]) == 0;
        if (!known) {
            fprintf(stderr, "unexpected CSR refusal code '%.32s' (rc %d): %s\n", code, rc,
                    err.msg);
            abort();
        }
    }
    ERR_clear_error();
    free(pem);
    return 0;
}
