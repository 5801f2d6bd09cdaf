/*
 * `fleetml device run`: one simulated viscometer, in two modes:
 *
 *   fleetml device run <id>      the certificate made by `fleetml device add`
 *                                (<data>/devices/<id>/), which is also the
 *                                state directory (outbox) unless --state;
 *   fleetml device run --claim <template> --serial <S> [--state DIR]
 *                                onboards once through the claim flow with
 *                                <data>/claims/<template>/claim.{crt,key}
 *                                (state directory default <data>/sim/<S>).
 *
 * Every measurement goes through the SDK's on-disk outbox, so a device
 * killed with -9 resends what was never answered when it starts again. It
 * sends a measurement every --interval seconds and prints one line per
 * result on stdout:
 *
 *   m-lz3k8q1a-000001 ok viscosity_high_mpas=4.12 ... latency_ms=3.2
 *   m-lz3k8q1a-000002 error out_of_range sweep[2]: ...
 *   m-lz3k8q1a-000003 dropped outbox full
 *
 * It also prints the shadow deltas it receives and reports each one back
 * as applied (reported = the delta), a minimal shadow loop:
 *
 *   shadow delta version=7 {"sample_rate_hz":20}
 *
 * Measurement ids carry a per-run prefix (the start time in base 36)
 * because the cloud answers a repeated id with the original result: a
 * restarted device counting from 1 again would get stale answers.
 */
#include "cli/cli.h"
#include "fleetml/device.h"
#include "fleetml/viscometer.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FIRMWARE "fleetml-sim/" FM_VERSION

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

/* Installs handlers without SA_RESTART so a blocking poll returns EINTR
 * and the loop notices the request promptly. */
static void install_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

struct run {
    fm_devclient *c;
    uint64_t resolved;
    uint64_t failed;
    bool announced; /* "ready as <id>" printed */
};

/* Appends " key=value" for each output; numbers with 3 significant digits,
 * which is the precision of the physics anyway. */
static void print_outputs(json_t *outputs)
{
    const char *key;
    json_t *v;
    json_object_foreach(outputs, key, v)
    {
        if (json_is_number(v))
            printf(" %s=%.3g", key, json_number_value(v));
        else if (json_is_string(v))
            printf(" %s=%s", key, json_string_value(v));
        else if (json_is_boolean(v))
            printf(" %s=%s", key, json_is_true(v) ? "true" : "false");
    }
}

static void on_result(void *ud, const char *mid, const char *status, const char *json, size_t len)
{
    struct run *r = ud;
    fm_devclient_result_info info = {0};
    (void)fm_devclient_result_info_get(r->c, &info);
    double latency_ms = (double)info.latency_ns / 1e6;
    r->resolved++;

    if (strcmp(status, "dropped") == 0) {
        r->failed++;
        printf("%s dropped outbox full\n", mid);
        fflush(stdout);
        return;
    }
    if (strcmp(status, "timeout") == 0) {
        r->failed++;
        if (info.attempts == 0)
            printf("%s timeout never sent: no connection to the broker (%.1f s)\n", mid,
                   latency_ms / 1000.0);
        else
            printf("%s timeout no result after %u attempt(s) (%.1f s)\n", mid, info.attempts,
                   latency_ms / 1000.0);
        fflush(stdout);
        return;
    }
    json_t *doc = json ? json_loadb(json, len, 0, NULL) : NULL;
    if (strcmp(status, "ok") == 0) {
        printf("%s ok", mid);
        print_outputs(json_object_get(doc, "outputs"));
        printf(" latency_ms=%.1f\n", latency_ms);
    } else {
        r->failed++;
        json_t *e = json_object_get(doc, "error");
        const char *code = json_string_value(json_object_get(e, "code"));
        const char *msg = json_string_value(json_object_get(e, "message"));
        printf("%s error %s %s\n", mid, code ? code : "unknown", msg ? msg : "");
    }
    json_decref(doc);
    fflush(stdout);
}

static void on_state(void *ud, bool connected, const char *reason)
{
    struct run *r = ud;
    if (!connected) {
        if (fm_devclient_error(r->c))
            fprintf(stderr, "fleetml device run: %s\n", reason);
        return;
    }
    if (!r->announced) {
        r->announced = true;
        printf("device %s connected\n", fm_devclient_id(r->c));
        fflush(stdout);
    }
    /* Learn the desired state that changed while we were away. */
    (void)fm_devclient_shadow_get(r->c);
}

/* The tiny shadow loop: print the delta and report it back as applied. */
static void on_shadow(void *ud, enum fm_shadow_kind kind, const char *json, size_t len)
{
    struct run *r = ud;
    json_t *doc = json_loadb(json, len, 0, NULL);
    json_t *state = json_object_get(doc, "state");
    long long version = (long long)json_integer_value(json_object_get(doc, "version"));
    if (kind == FM_SHADOW_DELTA || kind == FM_SHADOW_DOCUMENT) {
        json_t *delta = kind == FM_SHADOW_DELTA ? state : NULL;
        if (kind == FM_SHADOW_DOCUMENT) {
            /* Apply desired keys that reported does not match yet. */
            json_t *des = json_object_get(state, "desired"), *rep = json_object_get(state, "reported");
            const char *k;
            json_t *v;
            json_object_foreach(des, k, v)
            {
                if (!json_equal(v, json_object_get(rep, k))) {
                    if (!delta)
                        delta = json_object();
                    json_object_set(delta, k, v);
                }
            }
        }
        if (json_is_object(delta) && json_object_size(delta) > 0) {
            char *text = json_dumps(delta, JSON_COMPACT | JSON_SORT_KEYS);
            if (text) {
                printf("shadow delta version=%lld %s\n", version, text);
                fflush(stdout);
                int rc = fm_devclient_shadow_report(r->c, text);
                if (rc != 0)
                    fprintf(stderr, "fleetml device run: cannot report shadow: %s\n", fm_strerror(rc));
                free(text);
            }
        }
        if (kind == FM_SHADOW_DOCUMENT)
            json_decref(delta);
    } else {
        fprintf(stderr, "fleetml device run: shadow update rejected: %.*s\n", (int)len, json);
    }
    json_decref(doc);
}

static void usage(void) { fm_cli_usage("device run"); }

#define USAGE_ERR(...)                                                                             \
    do {                                                                                           \
        fprintf(stderr, "fleetml device run: " __VA_ARGS__);                                       \
        fputc('\n', stderr);                                                                       \
        return 2;                                                                                  \
    } while (0)

int fm_cmd_device_run(int argc, char **argv)
{
    /* Our own options first, so usage errors are reported before the
     * configuration is even loaded. */
    const char *s_count = fm_cli_take_opt(&argc, argv, "--count");
    const char *s_interval = fm_cli_take_opt(&argc, argv, "--interval");
    const char *s_seed = fm_cli_take_opt(&argc, argv, "--seed");
    const char *s_timeout = fm_cli_take_opt(&argc, argv, "--timeout");
    const char *s_claim = fm_cli_take_opt(&argc, argv, "--claim");
    const char *s_serial = fm_cli_take_opt(&argc, argv, "--serial");
    const char *s_state = fm_cli_take_opt(&argc, argv, "--state");
    const char *s_obmax = fm_cli_take_opt(&argc, argv, "--outbox-max");
    bool drop_oldest = fm_cli_take_flag(&argc, argv, "--drop-oldest");
    if (fm_cli_take_flag(&argc, argv, "--help") || fm_cli_take_flag(&argc, argv, "-h")) {
        usage();
        return 0;
    }
    uint64_t count = 0, seed = 0, obmax = 0;
    double interval = 5.0, timeout_s = 10.0;
    if (s_count && fm_cli_parse_u64(s_count, UINT64_MAX, &count) != 0)
        USAGE_ERR("--count expects a non-negative integer, got '%s'", s_count);
    if (s_interval && (fm_cli_parse_double(s_interval, &interval) != 0 || interval < 0.001 || interval > 86400))
        USAGE_ERR("--interval expects seconds in 0.001..86400, got '%s'", s_interval);
    if (s_timeout && (fm_cli_parse_double(s_timeout, &timeout_s) != 0 || timeout_s < 0.01 || timeout_s > 3600))
        USAGE_ERR("--timeout expects seconds in 0.01..3600, got '%s'", s_timeout);
    if (s_seed && fm_cli_parse_u64(s_seed, UINT64_MAX, &seed) != 0)
        USAGE_ERR("--seed expects a non-negative integer, got '%s'", s_seed);
    if (s_obmax && (fm_cli_parse_u64(s_obmax, FM_DEVCLIENT_MAX_PENDING_LIMIT - 1, &obmax) != 0 || obmax == 0))
        USAGE_ERR("--outbox-max expects 1..%d, got '%s'", FM_DEVCLIENT_MAX_PENDING_LIMIT - 1, s_obmax);
    if (!s_claim != !s_serial)
        USAGE_ERR("--claim and --serial go together");
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc != 0)
        return rc;
    const char *id = NULL;
    if (s_claim) {
        if (argc > 1) {
            fprintf(stderr, "fleetml device run: unexpected argument '%s' (claim mode takes no id)\n", argv[1]);
            usage();
            return 2;
        }
    } else {
        if (argc != 2 || argv[1][0] == '-') {
            if (argc > 2 || (argc == 2 && argv[1][0] == '-'))
                fprintf(stderr, "fleetml device run: unexpected argument '%s'\n", argv[argc > 2 ? 2 : 1]);
            usage();
            return 2;
        }
        id = argv[1];
        if (!fm_device_id_valid(id)) {
            fprintf(stderr, "fleetml device run: invalid device id '%s' (expected [a-z0-9][a-z0-9-]{2,63})\n", id);
            return 2;
        }
    }

    char ca[PATH_MAX], crt[PATH_MAX], key[PATH_MAX], state[PATH_MAX], rel[512];
    bool paths_ok = fm_config_path(&cfg, "pki/ca.crt", ca, sizeof ca) != NULL;
    if (s_claim) {
        snprintf(rel, sizeof rel, "claims/%s/claim.crt", s_claim);
        paths_ok = paths_ok && fm_config_path(&cfg, rel, crt, sizeof crt);
        snprintf(rel, sizeof rel, "claims/%s/claim.key", s_claim);
        paths_ok = paths_ok && fm_config_path(&cfg, rel, key, sizeof key);
        snprintf(rel, sizeof rel, "sim/%s", s_serial);
    } else {
        snprintf(rel, sizeof rel, "devices/%s/device.crt", id);
        paths_ok = paths_ok && fm_config_path(&cfg, rel, crt, sizeof crt);
        snprintf(rel, sizeof rel, "devices/%s/device.key", id);
        paths_ok = paths_ok && fm_config_path(&cfg, rel, key, sizeof key);
        snprintf(rel, sizeof rel, "devices/%s", id);
    }
    if (s_state)
        paths_ok = paths_ok && (size_t)snprintf(state, sizeof state, "%s", s_state) < sizeof state;
    else
        paths_ok = paths_ok && fm_config_path(&cfg, rel, state, sizeof state);
    if (!paths_ok) {
        fprintf(stderr, "fleetml device run: path too long\n");
        return 2;
    }
    if (access(crt, R_OK) != 0 || access(key, R_OK) != 0) {
        if (s_claim)
            fprintf(stderr, "fleetml device run: no claim certificate for template '%s' (%s; run `fleetml template claim-cert %s`)\n",
                    s_claim, crt, s_claim);
        else
            fprintf(stderr, "fleetml device run: no credentials for '%s' in %s/devices/%s (run `fleetml device add %s`)\n",
                    id, cfg.data_dir, id, id);
        return 1;
    }

    struct run r = {0};
    fm_devclient_claim claim = {
        .cert_path = crt,
        .key_path = key,
        .serial = s_serial,
        .model = "fleetml-sim-viscometer",
        .firmware = FIRMWARE,
        .timeout_ms = (int)(timeout_s * 1000.0),
    };
    fm_devclient_opts o = {
        .id = id,
        .host = cfg.broker_host,
        .port = cfg.broker_port,
        .ca_path = ca,
        .cert_path = s_claim ? NULL : crt,
        .key_path = s_claim ? NULL : key,
        .on_result = on_result,
        .on_state = on_state,
        .on_shadow = on_shadow,
        .ud = &r,
        .result_timeout_ms = (int)(timeout_s * 1000.0),
        .state_dir = state,
        .claim = s_claim ? &claim : NULL,
        .outbox_max_entries = (int)obmax,
        .outbox_policy = drop_oldest ? FM_OUTBOX_DROP_OLDEST : FM_OUTBOX_REFUSE_NEW,
    };
    fm_errbuf err;
    if (fm_devclient_new(&o, &r.c, &err) != 0) {
        fprintf(stderr, "fleetml device run: %s\n", err.msg);
        return 1;
    }
    install_signals();
    size_t leftover = fm_devclient_pending(r.c);
    if (leftover > 0)
        printf("outbox: %zu unanswered measurement(s) from an earlier run will be sent again\n", leftover);
    if (fm_devclient_claiming(r.c))
        printf("claiming a certificate as serial %s (template %s)\n", s_serial, s_claim);
    fflush(stdout);
    rc = fm_devclient_connect(r.c, &err);
    if (rc != 0 && rc != FM_EIO) {
        fprintf(stderr, "fleetml device run: %s\n", err.msg);
        fm_devclient_free(r.c);
        return 1;
    }
    /* FM_EIO means the broker is not reachable yet; the client keeps
     * retrying with backoff, which is what a real device would do. */
    if (rc != 0)
        fprintf(stderr, "fleetml device run: %s (retrying)\n", err.msg);

    fm_rng rng;
    if (!s_seed)
        seed = (uint64_t)fm_wall_ms() ^ ((uint64_t)getpid() << 40);
    fm_rng_seed(&rng, seed);
    char run_prefix[16];
    fm_cli_base36((uint64_t)fm_wall_ms(), run_prefix, sizeof run_prefix);

    const uint64_t interval_ns = (uint64_t)(interval * 1e9);
    /* The first measurement goes out as soon as the device is ready, or
     * after one interval anyway so an unreachable broker cannot stall the
     * schedule (the outbox keeps it until it can be sent). While the claim
     * runs nothing is measured: the device does not know who it is yet. */
    uint64_t next_send = fm_mono_ns() + interval_ns;
    bool scheduled_from_ready = false;
    uint64_t sent = 0;
    int exit_code = 0;

    while (!stop_requested) {
        if (fm_devclient_error(r.c)) {
            fprintf(stderr, "fleetml device run: %s\n", fm_devclient_error(r.c));
            exit_code = 1;
            break;
        }
        uint64_t now = fm_mono_ns();
        if (!scheduled_from_ready && fm_devclient_ready(r.c)) {
            scheduled_from_ready = true;
            if (sent == 0)
                next_send = now;
        }
        bool may_send = !fm_devclient_claiming(r.c);
        if (may_send && (count == 0 || sent < count) && now >= next_send) {
            char mid[FM_DEVICE_MEAS_ID_MAXLEN + 1];
            snprintf(mid, sizeof mid, "m-%s-%06llu", run_prefix, (unsigned long long)(sent + 1));
            fm_visc_truth truth;
            fm_visc_draw_truth(&rng, &truth);
            char *doc = NULL;
            size_t len = 0;
            rc = fm_visc_measurement_json(&rng, &truth, mid, FIRMWARE, fm_wall_ms(), &doc, &len);
            if (rc == 0)
                rc = fm_devclient_publish_measurement(r.c, doc, len, mid);
            fm_free(doc);
            if (rc == FM_EBUSY) {
                /* Not counted towards --count: it was never stored. */
                fprintf(stderr, "fleetml device run: outbox full; measurement not taken\n");
            } else if (rc != 0) {
                fprintf(stderr, "fleetml device run: cannot store measurement: %s\n", fm_strerror(rc));
                exit_code = 1;
                break;
            } else {
                sent++;
            }
            /* Keep the cadence, but after a long stall restart it rather
             * than firing a burst of catch-up measurements. */
            next_send += interval_ns;
            if (next_send < now)
                next_send = now + interval_ns;
        }
        /* Done when the measurements of this run are taken and the outbox
         * (including entries of earlier runs) is empty. */
        if (count != 0 && sent >= count && fm_devclient_pending(r.c) == 0)
            break;

        int wait_ms = 1000;
        if (may_send && (count == 0 || sent < count)) {
            uint64_t t = fm_mono_ns();
            uint64_t d = next_send > t ? (next_send - t + 999999) / 1000000 : 0;
            if (d < (uint64_t)wait_ms)
                wait_ms = (int)d;
        }
        rc = fm_devclient_loop(r.c, wait_ms);
        if (rc != 0) {
            fprintf(stderr, "fleetml device run: %s\n", fm_strerror(rc));
            exit_code = 1;
            break;
        }
    }

    if (r.failed > 0)
        exit_code = 1;
    /* Interrupted before everything was answered: the run is incomplete
     * (what is left stays in the outbox for the next run). */
    if (count != 0 && (sent < count || fm_devclient_pending(r.c) > 0))
        exit_code = 1;
    fm_devclient_free(r.c);
    return exit_code;
}
