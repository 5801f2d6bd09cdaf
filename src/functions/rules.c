/*
 * Rule documents (fleetml/rules.h): checking what the API and CLI receive,
 * and running a rule's jq filter and transform with libjq.
 *
 * jq programs are compiled once per rule and run on each event. libjq's
 * state is not shared between threads: the engine owns its compiled
 * programs, and the API compiles a throwaway one to check a document.
 */
#include "fleetml/rules.h"
#include "fleetml/events.h"
#include "fleetml/functions.h"
#include "fleetml/json.h"

#include <jq.h>
#include <stdio.h>
#include <string.h>

#define RULE_OUTPUTS_MAX 64

static bool name_ok(const char *s, size_t max)
{
    size_t n = s ? strlen(s) : 0;
    if (n == 0 || n > max)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (i > 0 && c == '-');
        if (!ok)
            return false;
    }
    return true;
}

/* Only the keys listed may appear in obj. */
static int only_keys(json_t *obj, const char *const *keys, const char *what, fm_errbuf *err)
{
    const char *k;
    json_t *v;
    json_object_foreach(obj, k, v) {
        bool known = false;
        for (size_t i = 0; keys[i]; i++)
            if (strcmp(keys[i], k) == 0)
                known = true;
        if (!known)
            return fm_errf(err, FM_EINVAL, "%s: unknown field '%s'", what, k);
    }
    return 0;
}

/* ---- jq ------------------------------------------------------------------------ */

typedef struct jq_err {
    char msg[256];
} jq_err;

static void on_jq_error(void *ud, jv msg)
{
    jq_err *e = ud;
    if (!e->msg[0]) {
        jv text = jv_get_kind(msg) == JV_KIND_STRING ? jv_copy(msg) : jv_dump_string(jv_copy(msg), 0);
        snprintf(e->msg, sizeof e->msg, "%s", jv_string_value(text));
        jv_free(text);
    }
    jv_free(msg);
}

typedef struct prog {
    jq_state *jq;
    jq_err err;
} prog;

/* Compiles program (NULL/"" -> nothing to compile, p->jq stays NULL). */
static int prog_compile(prog *p, const char *program, const char *what, fm_errbuf *err)
{
    memset(p, 0, sizeof *p);
    if (!program || !*program)
        return 0;
    if (strlen(program) > FM_RULE_PROGRAM_MAX)
        return fm_errf(err, FM_EINVAL, "%s: longer than %d bytes", what, FM_RULE_PROGRAM_MAX);
    p->jq = jq_init();
    if (!p->jq)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    jq_set_error_cb(p->jq, on_jq_error, &p->err);
    if (!jq_compile(p->jq, program)) {
        int rc = fm_errf(err, FM_EINVAL, "%s: jq cannot compile it: %s", what,
                         p->err.msg[0] ? p->err.msg : "syntax error");
        jq_teardown(&p->jq);
        return rc;
    }
    return 0;
}

static void prog_free(prog *p)
{
    if (p->jq)
        jq_teardown(&p->jq);
}

static jv jv_of_json(json_t *j)
{
    char *text = json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY);
    jv v = text ? jv_parse(text) : jv_invalid_with_msg(jv_string("out of memory"));
    free(text);
    return v;
}

static json_t *json_of_jv(jv v)
{
    jv text = jv_dump_string(v, 0); /* consumes v */
    json_t *j = json_loads(jv_string_value(text), JSON_DECODE_ANY, NULL);
    jv_free(text);
    return j;
}

/* Runs p on input, appending each output (at most RULE_OUTPUTS_MAX) to out;
 * first_only stops after one. */
static int prog_run(prog *p, json_t *input, json_t *out, bool first_only, const char *what,
                    fm_errbuf *err)
{
    p->err.msg[0] = '\0';
    jq_start(p->jq, jv_of_json(input), 0);
    int rc = 0;
    for (;;) {
        jv v = jq_next(p->jq);
        if (!jv_is_valid(v)) {
            if (jv_invalid_has_msg(jv_copy(v))) {
                jv msg = jv_invalid_get_msg(v);
                jv text = jv_get_kind(msg) == JV_KIND_STRING ? msg : jv_dump_string(msg, 0);
                rc = fm_errf(err, FM_EINVAL, "%s: %s", what, jv_string_value(text));
                jv_free(text);
            } else {
                jv_free(v);
            }
            break;
        }
        if (json_array_size(out) >= RULE_OUTPUTS_MAX) {
            jv_free(v);
            break;
        }
        json_t *j = json_of_jv(v);
        if (!j) {
            rc = fm_errf(err, FM_ENOMEM, "out of memory");
            break;
        }
        json_array_append_new(out, j);
        if (first_only)
            break;
    }
    return rc;
}

struct fm_rule_prog {
    prog filter, transform;
};

int fm_rule_prog_compile(json_t *rule, fm_rule_prog **out, fm_errbuf *err)
{
    fm_rule_prog *p = fm_calloc(1, sizeof *p);
    if (!p)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    int rc = prog_compile(&p->filter, json_string_value(json_object_get(rule, "filter")),
                          "filter", err);
    if (!rc)
        rc = prog_compile(&p->transform, json_string_value(json_object_get(rule, "transform")),
                          "transform", err);
    if (rc) {
        fm_rule_prog_free(p);
        return rc;
    }
    *out = p;
    return 0;
}

void fm_rule_prog_free(fm_rule_prog *p)
{
    if (!p)
        return;
    prog_free(&p->filter);
    prog_free(&p->transform);
    fm_free(p);
}

int fm_rule_prog_run(fm_rule_prog *p, json_t *event, json_t **outputs, fm_errbuf *err)
{
    json_t *out = json_array();
    if (!out)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    int rc = 0;
    bool pass = true;
    if (p->filter.jq) {
        json_t *first = json_array();
        rc = first ? prog_run(&p->filter, event, first, true, "filter", err)
                   : fm_errf(err, FM_ENOMEM, "out of memory");
        json_t *v = json_array_get(first, 0);
        pass = !rc && v && !json_is_false(v) && !json_is_null(v);
        json_decref(first);
    }
    if (!rc && pass) {
        if (p->transform.jq)
            rc = prog_run(&p->transform, event, out, false, "transform", err);
        else
            json_array_append(out, event);
    }
    if (rc) {
        json_decref(out);
        return rc;
    }
    *outputs = out;
    return 0;
}

/* ---- checking documents ---------------------------------------------------------- */

bool fm_rule_loopback_url(const char *url)
{
    static const char *const ok[] = {"http://127.0.0.1:", "http://127.0.0.1/", "http://localhost:",
                                     "http://localhost/", "http://[::1]:", "http://[::1]/"};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++)
        if (strncmp(url, ok[i], strlen(ok[i])) == 0)
            return true;
    return false;
}

static bool prefix_ok(const char *s)
{
    size_t n = s ? strlen(s) : 0;
    if (n == 0 || n > 128 || s[0] == '/' || s[n - 1] == '/')
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_' ||
                  (c == '/' && s[i + 1] != '/');
        if (!ok)
            return false;
    }
    return strstr(s, "..") == NULL;
}

static int check_target(json_t *t, size_t i, unsigned flags, json_t **out, fm_errbuf *err)
{
    char what[32];
    snprintf(what, sizeof what, "targets[%zu]", i);
    if (!json_is_object(t))
        return fm_errf(err, FM_EINVAL, "%s: must be an object", what);
    const char *type = json_string_value(json_object_get(t, "type"));
    if (!type)
        return fm_errf(err, FM_EINVAL, "%s: type is required", what);
    if (strcmp(type, "webhook") == 0) {
        static const char *const keys[] = {"type", "url", "secret", "timeout_ms", NULL};
        int rc = only_keys(t, keys, what, err);
        if (rc)
            return rc;
        const char *url = json_string_value(json_object_get(t, "url"));
        const char *secret = json_string_value(json_object_get(t, "secret"));
        json_t *tmo = json_object_get(t, "timeout_ms");
        bool loopback = (flags & FM_RULE_LOOPBACK_HTTP) && url && fm_rule_loopback_url(url);
        if (!url || strlen(url) > 2048 || (strncmp(url, "https://", 8) != 0 && !loopback))
            return fm_errf(err, FM_EINVAL,
                           "%s: url must be https://%s", what,
                           (flags & FM_RULE_LOOPBACK_HTTP) ? " (http:// only to a loopback address)"
                                                           : "");
        if (!secret || strlen(secret) < 16 || strlen(secret) > 256)
            return fm_errf(err, FM_EINVAL, "%s: secret (the HMAC key) must be 16..256 characters",
                           what);
        if (tmo && (!json_is_integer(tmo) || json_integer_value(tmo) < 100 ||
                    json_integer_value(tmo) > 60000))
            return fm_errf(err, FM_EINVAL, "%s: timeout_ms must be 100..60000", what);
        *out = json_pack("{s:s,s:s,s:s,s:I}", "type", type, "url", url, "secret", secret,
                         "timeout_ms", (json_int_t)(tmo ? json_integer_value(tmo) : 5000));
    } else if (strcmp(type, "function") == 0) {
        static const char *const keys[] = {"type", "function", NULL};
        int rc = only_keys(t, keys, what, err);
        if (rc)
            return rc;
        const char *fn = json_string_value(json_object_get(t, "function"));
        if (!name_ok(fn, FM_FN_NAME_MAX))
            return fm_errf(err, FM_EINVAL, "%s: function must name a function", what);
        *out = json_pack("{s:s,s:s}", "type", type, "function", fn);
    } else if (strcmp(type, "shadow") == 0) {
        static const char *const keys[] = {"type", NULL};
        int rc = only_keys(t, keys, what, err);
        if (rc)
            return rc;
        *out = json_pack("{s:s}", "type", type);
    } else if (strcmp(type, "lake") == 0) {
        static const char *const keys[] = {"type", "prefix", NULL};
        int rc = only_keys(t, keys, what, err);
        if (rc)
            return rc;
        const char *prefix = json_string_value(json_object_get(t, "prefix"));
        if (!prefix_ok(prefix))
            return fm_errf(err, FM_EINVAL,
                           "%s: prefix must be a relative path of [a-z0-9_-] segments", what);
        *out = json_pack("{s:s,s:s}", "type", type, "prefix", prefix);
    } else {
        return fm_errf(err, FM_EINVAL, "%s: unknown type '%s' (webhook, function, shadow, lake)",
                       what, type);
    }
    return *out ? 0 : fm_errf(err, FM_ENOMEM, "out of memory");
}

int fm_rule_check(json_t *doc, unsigned flags, json_t **out, fm_errbuf *err)
{
    static const char *const keys[] = {"name",    "event",   "filter", "transform",
                                       "targets", "retries", "enabled", NULL};
    if (!json_is_object(doc))
        return fm_errf(err, FM_EINVAL, "a rule is a JSON object");
    int rc = only_keys(doc, keys, "rule", err);
    if (rc)
        return rc;
    const char *name = json_string_value(json_object_get(doc, "name"));
    if (!name_ok(name, FM_RULE_NAME_MAX))
        return fm_errf(err, FM_EINVAL, "name: [a-z0-9][a-z0-9-]{0,63} is required");
    const char *event = json_string_value(json_object_get(doc, "event"));
    if (fm_event_type_parse(event) < 0)
        return fm_errf(err, FM_EINVAL, "event: unknown event type '%s'", event ? event : "");
    json_t *fj = json_object_get(doc, "filter"), *tj = json_object_get(doc, "transform");
    if ((fj && !json_is_string(fj)) || (tj && !json_is_string(tj)))
        return fm_errf(err, FM_EINVAL, "filter and transform are jq programs (strings)");
    json_t *retries = json_object_get(doc, "retries"), *enabled = json_object_get(doc, "enabled");
    if (retries && (!json_is_integer(retries) || json_integer_value(retries) < 0 ||
                    json_integer_value(retries) > FM_RULE_RETRIES_MAX))
        return fm_errf(err, FM_EINVAL, "retries must be 0..%d", FM_RULE_RETRIES_MAX);
    if (enabled && !json_is_boolean(enabled))
        return fm_errf(err, FM_EINVAL, "enabled must be true or false");
    json_t *targets = json_object_get(doc, "targets");
    size_t n = json_array_size(targets);
    if (!json_is_array(targets) || n == 0 || n > FM_RULE_TARGETS_MAX)
        return fm_errf(err, FM_EINVAL, "targets: 1..%d targets are required",
                       FM_RULE_TARGETS_MAX);
    json_t *canon = json_pack("{s:s,s:s,s:s,s:s,s:[],s:I,s:b}", "name", name, "event", event,
                              "filter", fj ? json_string_value(fj) : "", "transform",
                              tj ? json_string_value(tj) : "", "targets", "retries",
                              (json_int_t)(retries ? json_integer_value(retries) : 3), "enabled",
                              enabled ? json_is_true(enabled) : 1);
    if (!canon)
        return fm_errf(err, FM_ENOMEM, "out of memory");
    json_t *cts = json_object_get(canon, "targets");
    for (size_t i = 0; i < n && !rc; i++) {
        json_t *t = NULL;
        rc = check_target(json_array_get(targets, i), i, flags, &t, err);
        if (!rc)
            json_array_append_new(cts, t);
    }
    fm_rule_prog *p = NULL;
    if (!rc)
        rc = fm_rule_prog_compile(canon, &p, err);
    fm_rule_prog_free(p);
    if (rc) {
        json_decref(canon);
        return rc;
    }
    *out = canon;
    return 0;
}

json_t *fm_rule_redacted(json_t *rule)
{
    json_t *copy = json_deep_copy(rule);
    size_t i;
    json_t *t;
    json_array_foreach(json_object_get(copy, "targets"), i, t) {
        if (json_object_get(t, "secret"))
            json_object_set_new(t, "secret", json_string("********"));
    }
    return copy;
}

json_t *fm_rule_row_json(const fm_rule_row *row)
{
    json_t *spec = json_loads(row->spec_json, 0, NULL);
    json_t *doc = spec ? fm_rule_redacted(spec) : json_object();
    json_decref(spec);
    if (doc) {
        json_object_set_new(doc, "tenant", fm_json_str(row->tenant));
        json_object_set_new(doc, "position", json_integer(row->position));
        json_object_set_new(doc, "updated_by", fm_json_str(row->updated_by));
        json_object_set_new(doc, "updated_at", fm_json_time(row->updated_ms));
    }
    return doc;
}

json_t *fm_rule_log_json(const fm_rule_log *l)
{
    return json_pack("{s:I,s:s,s:s,s:s,s:i,s:f,s:s,s:o}", "seq", (json_int_t)l->seq, "event_id",
                     l->event_id, "target", l->target, "outcome", l->outcome, "attempt",
                     l->attempt, "duration_ms", (double)l->duration_us / 1000.0, "error", l->error,
                     "at", fm_json_time(l->at_ms));
}
