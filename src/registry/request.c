/*
 * Provisioning request parsing (fleet/provisioning/<client>/request): the
 * pure part of handle_provision() in handlers.c, kept free of the store,
 * the CA and MQTT so that it can be unit-tested and fuzzed on its own
 * (tests/fuzz/fuzz_provision.c). The checks and their messages are part of
 * the device contract (docs/protocol.md, provisioning-rejected.v1.json).
 */
#include "fleetml/registry.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>

#define PROV_SERIAL_MAX 64
#define PROV_CSR_MAX 16384
#define PROV_TEXT_MAX 64

static int serial_valid(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > PROV_SERIAL_MAX)
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '-' || *s == '_'))
            return 0;
    return 1;
}

/* Optional printable string field of at most max chars; "" when absent. */
static int opt_string(json_t *doc, const char *key, size_t max, const char **out)
{
    json_t *v = json_object_get(doc, key);
    *out = "";
    if (!v)
        return 0;
    if (!json_is_string(v) || json_string_length(v) > max)
        return FM_EINVAL;
    *out = json_string_value(v);
    for (const char *p = *out; *p; p++)
        if ((unsigned char)*p < 0x20)
            return FM_EINVAL;
    return 0;
}

static int refuse(fm_provision_request *out, char *code, size_t code_len, fm_errbuf *err,
                  const char *msg)
{
    fm_provision_request_free(out);
    if (code && code_len)
        snprintf(code, code_len, "%s", "invalid_request");
    return fm_errf(err, FM_EINVAL, "%s", msg);
}

int fm_provision_request_parse(const char *payload, size_t len, const char *client_id,
                               fm_provision_request *out, char *code, size_t code_len,
                               fm_errbuf *err)
{
    if (code && code_len)
        code[0] = '\0';
    if (!out)
        return fm_errf(err, FM_EINVAL, "out is required");
    memset(out, 0, sizeof *out);
    if (!client_id)
        client_id = "";

    json_error_t je;
    json_t *doc = payload ? json_loadb(payload, len, JSON_REJECT_DUPLICATES, &je) : NULL;
    out->doc = doc;
    if (!json_is_object(doc))
        return refuse(out, code, code_len, err, "payload is not a JSON object");
    const char *serial = json_string_value(json_object_get(doc, "serial"));
    json_t *csr = json_object_get(doc, "csr");
    const char *csr_pem = json_string_value(csr);
    if (!serial || !serial_valid(serial))
        return refuse(out, code, code_len, err,
                      "serial: expected 1..64 characters of [A-Za-z0-9_-]");
    if (strncmp(client_id, "prov-", 5) != 0 || strcmp(client_id + 5, serial) != 0)
        return refuse(out, code, code_len, err, "serial: must equal the client id after 'prov-'");
    if (!csr_pem || json_string_length(csr) > PROV_CSR_MAX)
        return refuse(out, code, code_len, err, "csr: expected a PEM certificate request");
    const char *model = "", *firmware = "";
    if (opt_string(doc, "model", PROV_TEXT_MAX, &model) ||
        opt_string(doc, "firmware", PROV_TEXT_MAX, &firmware))
        return refuse(out, code, code_len, err,
                      "model/firmware: expected strings of <= 64 chars");

    out->serial = serial;
    out->csr_pem = csr_pem;
    /* strlen, not the JSON length: fm_csr_parse gets the C string (jansson
     * refuses \u0000 anyway, as JSON_ALLOW_NUL is not set). */
    out->csr_len = strlen(csr_pem);
    out->model = model;
    out->firmware = firmware;
    return 0;
}

void fm_provision_request_free(fm_provision_request *req)
{
    if (!req)
        return;
    json_decref(req->doc);
    memset(req, 0, sizeof *req);
}
