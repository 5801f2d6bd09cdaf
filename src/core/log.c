#include "fleetml/core.h"

#include <jansson.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static _Atomic int min_level = FM_LOG_INFO;

static const char *level_names[] = {"debug", "info", "warn", "error"};

void fm_log_set_level(enum fm_log_level lvl) { atomic_store(&min_level, (int)lvl); }

int fm_log_level_parse(const char *s, enum fm_log_level *out)
{
    for (int i = 0; i < 4; i++) {
        if (strcmp(s, level_names[i]) == 0) {
            *out = (enum fm_log_level)i;
            return 0;
        }
    }
    return FM_EINVAL;
}

/* Serialises obj as one line and writes it with a single write(2) so lines
 * from concurrent threads never interleave. */
static void emit(json_t *obj)
{
    char *line = json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!line)
        return;
    size_t n = strlen(line);
    char *buf = fm_malloc(n + 2);
    if (buf) {
        memcpy(buf, line, n);
        buf[n] = '\n';
        ssize_t w = write(STDERR_FILENO, buf, n + 1);
        (void)w;
        fm_free(buf);
    }
    free(line);
}

static json_t *base(enum fm_log_level lvl, const char *component, const char *msg)
{
    char ts[40];
    json_t *o = json_object();
    if (!o)
        return NULL;
    json_object_set_new(o, "ts", json_string(fm_rfc3339(fm_wall_ms(), ts, sizeof ts)));
    json_object_set_new(o, "level", json_string(level_names[lvl]));
    json_object_set_new(o, "component", json_string(component ? component : "main"));
    /* Messages may carry bytes from untrusted input: store them lossily. */
    json_t *m = json_string(msg);
    if (!m)
        m = json_string("(message was not valid UTF-8)");
    json_object_set_new(o, "msg", m);
    return o;
}

void fm_logf(enum fm_log_level lvl, const char *component, const char *fmt, ...)
{
    if ((int)lvl < atomic_load_explicit(&min_level, memory_order_relaxed))
        return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    json_t *o = base(lvl, component, msg);
    if (!o)
        return;
    emit(o);
    json_decref(o);
}

void fm_logkv(enum fm_log_level lvl, const char *component, const char *msg, ...)
{
    if ((int)lvl < atomic_load_explicit(&min_level, memory_order_relaxed))
        return;
    json_t *o = base(lvl, component, msg);
    if (!o)
        return;
    va_list ap;
    va_start(ap, msg);
    for (;;) {
        const char *k = va_arg(ap, const char *);
        if (!k)
            break;
        const char *v = va_arg(ap, const char *);
        json_t *js = json_string(v ? v : "");
        json_object_set_new(o, k, js ? js : json_string("(invalid UTF-8)"));
    }
    va_end(ap);
    emit(o);
    json_decref(o);
}
