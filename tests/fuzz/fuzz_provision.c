/*
 * libFuzzer target: provisioning requests (fleet/provisioning/<client>/request)
 * and the CSR they carry.
 *
 * Input: "<client id>\n<payload>". The client id is what handle_provision()
 * takes from the topic (no '/', < 96 bytes; inputs outside that are
 * skipped); the payload is the MQTT message. Runs
 * fm_provision_request_parse and, on what it accepts, fm_csr_parse on the
 * csr field, as handle_provision() does (the store, template and CA steps
 * between them are not input parsing). tests/fuzz/fuzz_csr.c fuzzes
 * fm_csr_parse on raw PEM, which mutates far better than PEM inside JSON.
 */
#include "fleetml/pki.h"
#include "fleetml/registry.h"
#include "fuzz_common.h"

#include <openssl/err.h>

static int serial_ok(const char *s)
{
    size_t n = strlen(s);
    if (n < 1 || n > 64)
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '-' || *s == '_'))
            return 0;
    return 1;
}

static int text_ok(const char *s)
{
    if (!s || strlen(s) > 64)
        return 0;
    for (; *s; s++)
        if ((unsigned char)*s < 0x20)
            return 0;
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *nl = memchr(data, '\n', size);
    if (!nl)
        return 0;
    size_t clen = (size_t)(nl - data);
    if (clen >= 96 || memchr(data, '/', clen) || memchr(data, 0, clen))
        return 0;
    char client[96];
    memcpy(client, data, clen);
    client[clen] = '\0';
    size_t plen = size - clen - 1;
    char *payload = fuzz_bytes(nl + 1, plen);

    fm_provision_request req;
    char code[32];
    fm_errbuf err;
    memset(code, 'x', sizeof code);
    int rc = fm_provision_request_parse(payload, plen, client, &req, code, sizeof code, &err);
    if (rc != 0) {
        FUZZ_CHECK(rc == FM_EINVAL);
        FUZZ_CHECK(strcmp(code, "invalid_request") == 0);
        FUZZ_CHECK(req.doc == NULL);
        FUZZ_CHECK(strnlen(err.msg, sizeof err.msg) < sizeof err.msg);
        fm_provision_request_free(&req); /* documented as safe */
        free(payload);
        return 0;
    }
    FUZZ_CHECK(code[0] == '\0');
    FUZZ_CHECK(req.doc && req.serial && req.csr_pem && req.model && req.firmware);
    FUZZ_CHECK(serial_ok(req.serial));
    FUZZ_CHECK(strncmp(client, "prov-", 5) == 0 && strcmp(client + 5, req.serial) == 0);
    FUZZ_CHECK(req.csr_len == strlen(req.csr_pem) && req.csr_len <= 16384);
    FUZZ_CHECK(text_ok(req.model) && text_ok(req.firmware));

    fm_csr *csr = NULL;
    char ccode[32] = "";
    rc = fm_csr_parse(req.csr_pem, req.csr_len, &csr, ccode, &err);
    if (rc == 0) {
        FUZZ_CHECK(csr != NULL && ccode[0] == '\0');
        fm_csr_free(csr);
    } else {
        FUZZ_CHECK(csr == NULL);
        FUZZ_CHECK(ccode[0] != '\0');
    }
    fm_provision_request_free(&req);
    fm_provision_request_free(&req); /* idempotent */
    ERR_clear_error();
    free(payload);
    return 0;
}
