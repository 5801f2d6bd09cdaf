/*
 * The device's identity file, `<state>/identity.json`, written once when the
 * claim flow succeeds:
 *
 *   {"device_id": "acme-sn-0001", "serial": "SN-0001",
 *    "endpoint": {"host": "mqtt.example.net", "port": 8883}}
 *
 * It is written before `<state>/device.crt`, whose existence is what marks
 * the device as provisioned, so a provisioned device always has it.
 */
#include "fleetml/device.h"
#include "fleetml/measurement.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>

int fm_device_identity_write(const char *path, const fm_device_identity *id, fm_errbuf *err)
{
    if (!fm_device_id_valid(id->device_id))
        return fm_errf(err, FM_EINVAL, "invalid device id '%s'", id->device_id);
    json_t *doc = json_pack("{s:s}", "device_id", id->device_id);
    if (doc && id->serial[0])
        json_object_set_new(doc, "serial", json_string(id->serial));
    if (doc && id->host[0])
        json_object_set_new(doc, "endpoint",
                            json_pack("{s:s, s:i}", "host", id->host, "port", id->port));
    char *text = doc ? json_dumps(doc, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;
    json_decref(doc);
    if (!text)
        return fm_errf(err, FM_ENOMEM, "identity: out of memory");
    fm_strbuf b = {0};
    fm_strbuf_printf(&b, "%s\n", text);
    free(text); /* jansson allocates with malloc */
    char *out = NULL;
    size_t len = 0;
    int rc = fm_strbuf_take(&b, &out, &len);
    if (rc != 0)
        return fm_errf(err, rc, "identity: out of memory");
    rc = fm_write_file_atomic(path, out, len, 0644);
    fm_free(out);
    if (rc != 0)
        return fm_errf(err, rc, "cannot write %s: %s", path, fm_strerror(rc));
    return 0;
}

int fm_device_identity_parse(const char *text, size_t len, fm_device_identity *out,
                             fm_errbuf *err)
{
    memset(out, 0, sizeof *out);
    json_error_t jerr;
    json_t *doc = json_loadb(text, len, 0, &jerr);
    if (!json_is_object(doc)) {
        json_decref(doc);
        return fm_errf(err, FM_EINVAL, "identity: not a JSON object%s%s", doc ? "" : ": ",
                       doc ? "" : jerr.text);
    }
    int rc = FM_EINVAL;
    const char *id = json_string_value(json_object_get(doc, "device_id"));
    json_t *serial = json_object_get(doc, "serial");
    json_t *ep = json_object_get(doc, "endpoint");
    if (!id || !fm_device_id_valid(id)) {
        fm_errf(err, rc, "identity: missing or invalid device_id");
        goto out;
    }
    snprintf(out->device_id, sizeof out->device_id, "%s", id);
    if (serial) {
        const char *s = json_string_value(serial);
        if (!s || strlen(s) >= sizeof out->serial) {
            fm_errf(err, rc, "identity: serial must be a string of at most %zu characters",
                    sizeof out->serial - 1);
            goto out;
        }
        snprintf(out->serial, sizeof out->serial, "%s", s);
    }
    if (ep && !json_is_null(ep)) {
        const char *host = json_string_value(json_object_get(ep, "host"));
        json_t *port = json_object_get(ep, "port");
        if (!json_is_object(ep) || !host || !host[0] || strlen(host) >= sizeof out->host ||
            !json_is_integer(port) || json_integer_value(port) < 1 ||
            json_integer_value(port) > 65535) {
            fm_errf(err, rc, "identity: endpoint must be {\"host\": string, \"port\": 1..65535}");
            goto out;
        }
        snprintf(out->host, sizeof out->host, "%s", host);
        out->port = (int)json_integer_value(port);
    }
    rc = 0;
out:
    json_decref(doc);
    return rc;
}

int fm_device_identity_read(const char *path, fm_device_identity *out, fm_errbuf *err)
{
    char *text = NULL;
    size_t len = 0;
    int rc = fm_read_file(path, &text, &len);
    if (rc != 0)
        return fm_errf(err, rc, "cannot read %s: %s", path, fm_strerror(rc));
    rc = fm_device_identity_parse(text, len, out, err);
    fm_free(text);
    return rc;
}
