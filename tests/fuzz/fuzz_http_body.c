/*
 * libFuzzer target: HTTP API request bodies and pagination cursors
 * (src/api/body.c), the code that reads what a web client sends.
 *
 * Input: a request body as the API receives it. It goes through
 * fm_api_parse_body and, when that accepts it, through every field reader
 * the handlers use (strings, integers, booleans, roles, label outputs). The
 * same bytes are also decoded as a cursor.
 *
 * Invariants on top of ASan/UBSan:
 *  - a body is accepted only as a JSON object; a rejection has a message;
 *  - a string field that is accepted has 1..max bytes and no control
 *    character; an integer is within its bounds; roles parse to a non-empty
 *    mask whose canonical list parses back to the same mask;
 *  - label outputs are accepted only when every key is a model output and
 *    every value a finite number;
 *  - a cursor that decodes re-encodes to a cursor decoding to the same
 *    values (so clients cannot make two cursors mean one position).
 */
#include "fleetml/api.h"
#include "fleetml/auth.h"
#include "fuzz_common.h"

#include <jansson.h>
#include <math.h>

static const char *const OUTPUTS[] = {"viscosity_high_mpas", "viscosity_low_mpas",
                                      "hematocrit_pct"};

static void check_str(json_t *doc, const char *key, size_t max)
{
    const char *s = NULL;
    char msg[192] = "";
    if (fm_api_get_str(doc, key, true, max, &s, msg, sizeof msg) == 0) {
        FUZZ_CHECK(s);
        size_t n = strlen(s);
        FUZZ_CHECK(n >= 1 && n <= max);
        for (size_t i = 0; i < n; i++)
            FUZZ_CHECK((unsigned char)s[i] >= 0x20 && s[i] != 0x7f);
    } else {
        FUZZ_CHECK(msg[0]);
    }
}

static void check_cursor(const uint8_t *data, size_t size)
{
    char *c = fuzz_cstr(data, size);
    int64_t a, b, a2, b2;
    char s[80], s2[80], enc[300];
    if (fm_api_cursor_decode(c, &a, &b, s, sizeof s) == 0) {
        FUZZ_CHECK(fm_api_cursor_encode(a, b, s, enc, sizeof enc) == 0);
        FUZZ_CHECK(fm_api_cursor_decode(enc, &a2, &b2, s2, sizeof s2) == 0);
        FUZZ_CHECK(a == a2 && b == b2 && strcmp(s, s2) == 0);
    }
    free(c);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    check_cursor(data, size);
    char *body = fuzz_bytes(data, size);
    json_t *doc = NULL;
    char msg[192] = "";
    int rc = fm_api_parse_body(body, size, &doc, msg, sizeof msg);
    if (rc != 0) {
        FUZZ_CHECK(doc == NULL && msg[0]);
        free(body);
        return 0;
    }
    FUZZ_CHECK(json_is_object(doc));
    check_str(doc, "username", 64);
    check_str(doc, "password", 16384);
    check_str(doc, "source", 128);
    long long v = -1;
    /* null reads as absent: v is only set for an integer */
    if (fm_api_get_int(doc, "cert_days", false, 1, 3650, &v, msg, sizeof msg) == 0 &&
        json_is_integer(json_object_get(doc, "cert_days")))
        FUZZ_CHECK(v >= 1 && v <= 3650);
    bool flag;
    fm_api_get_bool(doc, "allow_reprovision", false, &flag, msg, sizeof msg);
    unsigned mask = 0, again = 0;
    if (fm_api_get_roles(doc, "roles", &mask, msg, sizeof msg) == 0) {
        char list[128];
        FUZZ_CHECK(mask != 0);
        FUZZ_CHECK(fm_auth_roles_format(mask, list, sizeof list) == 0);
        FUZZ_CHECK(fm_auth_roles_parse(list, &again) == 0 && again == mask);
    }
    json_t *outs = json_object_get(doc, "outputs");
    if (fm_api_check_label_outputs(outs, OUTPUTS, 3, msg, sizeof msg) == 0) {
        const char *k;
        json_t *x;
        json_object_foreach(outs, k, x) {
            FUZZ_CHECK(json_is_number(x) && isfinite(json_number_value(x)));
            FUZZ_CHECK(strcmp(k, OUTPUTS[0]) == 0 || strcmp(k, OUTPUTS[1]) == 0 ||
                       strcmp(k, OUTPUTS[2]) == 0);
        }
    }
    json_decref(doc);
    free(body);
    return 0;
}
