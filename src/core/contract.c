/*
 * The device contract's grammar (see include/fleetml/contract.h). Kept free
 * of the rest of fleetml so the broker plugin can compile it in.
 */
#include "fleetml/contract.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

static bool lower_alnum(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }

bool fm_device_id_valid(const char *s)
{
    if (!s)
        return false;
    size_t n = strnlen(s, FM_DEVICE_ID_MAX + 1);
    if (n < FM_DEVICE_ID_MIN || n > FM_DEVICE_ID_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        /* The first character may not be '-', so an id is never mistaken
         * for a command-line option. */
        if (!lower_alnum(s[i]) && (i == 0 || s[i] != '-'))
            return false;
    }
    return strcmp(s, "provisioning") != 0 && strncmp(s, "fleetml-", 8) != 0;
}

bool fm_measurement_id_char(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
           c == '.' || c == '_' || c == ':' || c == '-';
}

bool fm_measurement_id_valid(const char *s, size_t len)
{
    if (!s || len < 1 || len > FM_MEAS_ID_MAX)
        return false;
    for (size_t i = 0; i < len; i++)
        if (!fm_measurement_id_char((unsigned char)s[i]))
            return false;
    return true;
}

bool fm_topic_device(const char *topic, const char *leaf, char *out, size_t len)
{
    size_t rl = strlen(FM_TOPIC_ROOT), ll = strlen(leaf), tl = strlen(topic);
    if (tl < rl + 1 + ll + 1 || strncmp(topic, FM_TOPIC_ROOT, rl) != 0 ||
        strcmp(topic + tl - ll, leaf) != 0 || topic[tl - ll - 1] != '/')
        return false;
    size_t idl = tl - ll - 1 - rl;
    if (idl >= len)
        return false;
    memcpy(out, topic + rl, idl);
    out[idl] = '\0';
    return fm_device_id_valid(out);
}

bool fm_topic_build(char *buf, size_t len, const char *device, const char *leaf)
{
    int n = snprintf(buf, len, "%s%s/%s", FM_TOPIC_ROOT, device, leaf);
    return n > 0 && (size_t)n < len;
}

char *fm_reply_topic(const char *device_id, const char *rt, const char *default_leaf, char *buf,
                     size_t len)
{
    char prefix[FM_DEVICE_ID_MAX + sizeof FM_TOPIC_ROOT + 2];
    int n = snprintf(prefix, sizeof prefix, "%s%s/", FM_TOPIC_ROOT, device_id);
    if (rt && n > 0 && (size_t)n < sizeof prefix && strncmp(rt, prefix, (size_t)n) == 0 &&
        rt[n] != '\0' && !strpbrk(rt, "+#") && strlen(rt) < len) {
        snprintf(buf, len, "%s", rt);
        return buf;
    }
    if (!fm_topic_build(buf, len, device_id, default_leaf) && len)
        buf[0] = '\0';
    return buf;
}

size_t fm_error_doc(char *buf, size_t len, const char *mid, const char *code,
                    const char *message)
{
    json_t *doc = json_pack("{s:s, s:s, s:{s:s, s:s}}", "id", mid ? mid : "", "status", "error",
                            "error", "code", code, "message", message);
    if (!doc)
        return 0;
    size_t n = json_dumpb(doc, buf, len, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(doc);
    if (n == 0 || n >= len)
        return 0;
    buf[n] = '\0';
    return n;
}

char *fm_ok_doc(const char *mid, const char *model_ref, const char *const *names,
                const float *values, size_t n, const char *received_at)
{
    if (!mid || !model_ref || !received_at || (n && (!names || !values)))
        return NULL;
    json_t *outputs = json_object();
    if (!outputs)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        /* Three decimals keep results stable and compact. */
        double v = round((double)values[i] * 1000.0) / 1000.0;
        if (!names[i] || json_object_set_new(outputs, names[i], json_real(v)) != 0) {
            json_decref(outputs);
            return NULL;
        }
    }
    json_t *doc = json_pack("{s:s, s:s, s:s, s:o, s:s}", "id", mid, "status", "ok", "model",
                            model_ref, "outputs", outputs, "received_at", received_at);
    if (!doc)
        return NULL;
    char *s = json_dumps(doc, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10));
    json_decref(doc);
    return s;
}

bool fm_json_too_deep(const json_t *v, int max)
{
    if (!json_is_object(v) && !json_is_array(v))
        return false;
    if (max <= 0)
        return true;
    if (json_is_array(v)) {
        for (size_t i = 0; i < json_array_size(v); i++)
            if (fm_json_too_deep(json_array_get(v, i), max - 1))
                return true;
        return false;
    }
    const char *k;
    json_t *c;
    json_object_foreach((json_t *)v, k, c) {
        if (fm_json_too_deep(c, max - 1))
            return true;
    }
    return false;
}
