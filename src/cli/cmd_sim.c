/*
 * `fleetml sim`: many simulated devices from one thread.
 *
 *   fleetml sim --devices N (--rate R | --inflight W) [--prefix sim]
 *               [--duration SECONDS] [--data DIR] [--json] [--provision]
 *               [--seed S] [--timeout SECONDS] [--drain SECONDS] [--claim TEMPLATE]
 *
 * Every device is a full fm_devclient (its own TLS session and MQTT
 * connection), and all of them are driven by a single epoll loop over the
 * libmosquitto sockets. A thread per device would measure the scheduler
 * more than the platform once N reaches the thousands, and would make the
 * generator's own latency noise grow with N. The loop's cost follows
 * events, not N: it only touches devices with socket events or due timers
 * (a min-heap of per-device deadlines: the next open-loop send and the
 * client's own housekeeping, fm_devclient_next_timeout_ms()).
 *
 * Load models:
 *   --rate R      open loop: each device sends R measurements per second at
 *                 a fixed cadence with a random phase, whether or not
 *                 earlier results have arrived (up to the SDK's pending cap;
 *                 sends refused at the cap are reported as "skipped").
 *   --inflight W  closed loop: each device keeps W requests outstanding and
 *                 sends the next one as soon as a result arrives, which
 *                 finds the platform's saturation throughput.
 *
 * With --claim TEMPLATE every device onboards itself through the claim flow
 * (serials SIM-0001, SIM-0002, ...; state directory <data>/sim/<serial>/,
 * claim certificate <data>/claims/<template>/) and sends through the SDK's
 * on-disk outbox; a device provisioned by an earlier run reuses its
 * certificate. Claims run inside the same epoll loop as everything else.
 *
 * Latency is measured from handing the measurement to the SDK until its
 * result arrives, including any retries. When the run ends (duration or
 * the first SIGINT) sending stops and outstanding results are awaited for
 * up to --drain seconds (a second SIGINT skips that).
 */
#include "cli/cli.h"
#include "fleetml/device.h"
#include "fleetml/viscometer.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#define FIRMWARE "fleetml-sim/" FM_VERSION
#define NS_PER_S 1000000000ull
#define NS_PER_MS 1000000ull
/* New connections started per 10 ms: a TLS handshake storm of thousands
 * of devices at once would mostly measure the broker's accept queue, so the
 * fleet is brought up at up to about 2000 devices per second. The budget is
 * computed from elapsed time, not from loop iterations, so the ramp does
 * not depend on how often the loop wakes up. */
#define CONNECTS_PER_TICK 20
#define CONNECT_TICK_NS (10 * NS_PER_MS)
/* At most this many first connections (TCP + TLS + CONNECT + SUBSCRIBE)
 * in progress at once: when the broker (or this process) is the
 * bottleneck the ramp slows down instead of piling up handshakes that then
 * hit the connect timeout. */
#define MAX_CONNECTING 256
/* How often the ramp-up's progress line is redrawn (terminals only). */
#define RAMP_SHOW_NS (200 * 1000 * 1000ull)
/* Wake-up granularity while the ramp or the drain runs. */
#define RAMP_WAKE_MS 5
#define DRAIN_CHECK_NS (20 * NS_PER_MS)
#define PROGRESS_PERIOD_NS (5 * NS_PER_S)
#define PROVISION_PARALLEL 4

static volatile sig_atomic_t signals_seen;

static void on_signal(int sig)
{
    (void)sig;
    if (signals_seen < 2)
        signals_seen++;
}

struct sim;

struct simdev {
    struct sim *sim;
    fm_devclient *c;
    char id[FM_DEVICE_ID_MAXLEN + 1];
    int reg_fd;          /* fd registered with epoll, -1 = none */
    uint64_t reg_epoch;  /* fm_devclient_fd_epoch() at registration */
    uint32_t reg_events;
    bool started;        /* send schedule running (device was ready once) */
    bool announced;      /* claim mode: "provisioned as" printed */
    bool failed;         /* claim mode: gave up (reported once) */
    bool ready;          /* fm_devclient_ready() when last looked at */
    bool ever_ready;     /* became ready at least once */
    bool first_done;     /* first connection attempt over (ready, or dropped) */
    uint64_t next_send_ns;
    uint64_t misc_ns;    /* fm_devclient_loop_misc() due */
    uint64_t due_ns;     /* heap key: min(misc_ns, next_send_ns while sending) */
    int32_t heap_pos;    /* index in sim.heap, -1 = not queued */
    uint64_t seq;
};

struct sim {
    /* options */
    unsigned n_devices;
    double rate;
    unsigned inflight;
    double duration_s;
    uint64_t started_ns;       /* run start */
    uint64_t all_connected_ns; /* first moment every device was connected (0 = never) */
    double drain_s;
    double connect_rate; /* new connections per second (0 = as fast as the ramp allows) */
    double timeout_s;
    bool json;
    bool provision;
    const char *claim; /* template, or NULL */
    const char *prefix;
    uint64_t seed;
    double hct_shift; /* --hct-shift: a drifting patient mix */

    int ep;
    struct simdev *devs;
    /* Min-heap of device indices by due_ns: the loop only touches devices
     * with socket events or due timers, never the whole fleet. */
    uint32_t *heap;
    uint32_t heap_n;
    unsigned n_ready;      /* devices ready right now */
    unsigned n_ever_ready; /* devices that were ready at least once */
    unsigned n_first_done; /* devices whose first connection attempt ended */
    uint64_t interval_ns;  /* open loop: between two sends of one device */
    fm_rng rng;
    char run_prefix[16];
    /* Optional pool of pre-generated measurements (--payload-pool): the
     * load generator then only patches the id, so it costs little CPU and
     * the machine's cores go to the system under test. */
    unsigned pool_n;
    char **pool;
    size_t *pool_len, *pool_id_off;
    bool sending;

    uint64_t sent, ok, errors, timeouts, skipped;
    fm_lathist hist;   /* whole run */
    fm_lathist window; /* since the last progress line */
    uint64_t window_results;
};

/* ---- option parsing ------------------------------------------------------- */

static void usage(void) { fm_cli_usage("sim"); }

#define USAGE_ERR(...)                                                                             \
    do {                                                                                           \
        fprintf(stderr, "fleetml sim: " __VA_ARGS__);                                              \
        fputc('\n', stderr);                                                                       \
        return 2;                                                                                  \
    } while (0)

static int parse_args(int *argc, char **argv, struct sim *s)
{
    const char *v_devices = fm_cli_take_opt(argc, argv, "--devices");
    const char *v_rate = fm_cli_take_opt(argc, argv, "--rate");
    const char *v_inflight = fm_cli_take_opt(argc, argv, "--inflight");
    const char *v_prefix = fm_cli_take_opt(argc, argv, "--prefix");
    const char *v_duration = fm_cli_take_opt(argc, argv, "--duration");
    const char *v_seed = fm_cli_take_opt(argc, argv, "--seed");
    const char *v_pool = fm_cli_take_opt(argc, argv, "--payload-pool");
    const char *v_timeout = fm_cli_take_opt(argc, argv, "--timeout");
    const char *v_drain = fm_cli_take_opt(argc, argv, "--drain");
    const char *v_crate = fm_cli_take_opt(argc, argv, "--connect-rate");
    const char *v_shift = fm_cli_take_opt(argc, argv, "--hct-shift");
    if (v_shift && (fm_cli_parse_double(v_shift, &s->hct_shift) != 0 || s->hct_shift < -45 ||
                    s->hct_shift > 45)) {
        fprintf(stderr, "fleetml sim: --hct-shift expects -45..45 (hematocrit points)\n");
        return 2;
    }
    s->claim = fm_cli_take_opt(argc, argv, "--claim");
    s->json = fm_cli_take_flag(argc, argv, "--json");
    s->provision = fm_cli_take_flag(argc, argv, "--provision");

    uint64_t u;
    if (!v_devices)
        USAGE_ERR("--devices N is required");
    if (fm_cli_parse_u64(v_devices, 100000, &u) != 0 || u == 0)
        USAGE_ERR("--devices expects 1..100000, got '%s'", v_devices);
    s->n_devices = (unsigned)u;
    if (s->claim && s->provision)
        USAGE_ERR("--claim and --provision are alternatives; give one");
    if (s->claim && u > 9999)
        USAGE_ERR("--claim supports up to 9999 devices");
    if (v_rate && v_inflight)
        USAGE_ERR("--rate and --inflight are alternatives; give one");
    if (v_crate && (fm_cli_parse_double(v_crate, &s->connect_rate) != 0 || s->connect_rate <= 0))
        USAGE_ERR("--connect-rate expects a positive number of connections per second, got '%s'",
                  v_crate);
    if (!v_rate && !v_inflight)
        USAGE_ERR("give --rate R (per device per second) or --inflight W");
    if (v_rate && (fm_cli_parse_double(v_rate, &s->rate) != 0 || s->rate <= 0 || s->rate > 10000))
        USAGE_ERR("--rate expects a number in (0, 10000], got '%s'", v_rate);
    if (v_inflight) {
        if (fm_cli_parse_u64(v_inflight, FM_DEVCLIENT_MAX_PENDING_LIMIT, &u) != 0 || u == 0)
            USAGE_ERR("--inflight expects 1..%d, got '%s'", FM_DEVCLIENT_MAX_PENDING_LIMIT, v_inflight);
        s->inflight = (unsigned)u;
    }
    s->prefix = v_prefix ? v_prefix : "sim";
    char probe[FM_DEVICE_ID_MAXLEN + 16];
    snprintf(probe, sizeof probe, "%s-%04u", s->prefix, s->n_devices);
    if (!fm_device_id_valid(probe))
        USAGE_ERR("--prefix '%s' does not make valid device ids (e.g. '%s')", s->prefix, probe);
    if (v_duration && (fm_cli_parse_double(v_duration, &s->duration_s) != 0 || s->duration_s <= 0))
        USAGE_ERR("--duration expects positive seconds, got '%s'", v_duration);
    s->timeout_s = 10.0;
    if (v_timeout && (fm_cli_parse_double(v_timeout, &s->timeout_s) != 0 || s->timeout_s < 0.01 ||
                      s->timeout_s > 3600))
        USAGE_ERR("--timeout expects seconds in 0.01..3600, got '%s'", v_timeout);
    s->drain_s = 5.0;
    if (v_drain && (fm_cli_parse_double(v_drain, &s->drain_s) != 0 || s->drain_s < 0 || s->drain_s > 3600))
        USAGE_ERR("--drain expects seconds in 0..3600, got '%s'", v_drain);
    if (v_pool) {
        if (fm_cli_parse_u64(v_pool, 4096, &u) != 0)
            USAGE_ERR("--payload-pool expects 0..4096, got '%s'", v_pool);
        s->pool_n = (unsigned)u;
    }
    if (v_seed) {
        if (fm_cli_parse_u64(v_seed, UINT64_MAX, &u) != 0)
            USAGE_ERR("--seed expects a non-negative integer, got '%s'", v_seed);
        s->seed = u;
    } else {
        s->seed = (uint64_t)fm_wall_ms() ^ ((uint64_t)getpid() << 40);
    }
    return 0;
}

/* ---- provisioning ---------------------------------------------------------- */

static bool has_credentials(const fm_config *cfg, const char *id)
{
    char rel[256], crt[PATH_MAX], key[PATH_MAX];
    snprintf(rel, sizeof rel, "devices/%s/device.crt", id);
    if (!fm_config_path(cfg, rel, crt, sizeof crt))
        return false;
    snprintf(rel, sizeof rel, "devices/%s/device.key", id);
    if (!fm_config_path(cfg, rel, key, sizeof key))
        return false;
    return access(crt, R_OK) == 0 && access(key, R_OK) == 0;
}

/* Starts `fleetml device add <id> --data DIR` from our own executable. Its
 * stdout goes to our stderr so that --json output stays one clean line. */
static pid_t spawn_add(const fm_config *cfg, const char *id)
{
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    dup2(STDERR_FILENO, STDOUT_FILENO);
    char *args[] = {"fleetml", "device", "add", (char *)id, "--data", (char *)cfg->data_dir, NULL};
    execv("/proc/self/exe", args);
    fprintf(stderr, "fleetml sim: cannot run /proc/self/exe: %s\n", strerror(errno));
    _exit(127);
}

static int reap_one(unsigned *running, unsigned *failed)
{
    int status;
    pid_t pid;
    do
        pid = wait(&status);
    while (pid < 0 && errno == EINTR);
    if (pid < 0)
        return FM_EIO;
    (*running)--;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        (*failed)++;
    return 0;
}

/* Provisions missing devices a few at a time (key generation is CPU bound,
 * and the device registry serialises writes anyway). */
static int provision(const fm_config *cfg, struct sim *s)
{
    unsigned running = 0, failed = 0, added = 0;
    for (unsigned i = 0; i < s->n_devices; i++) {
        if (has_credentials(cfg, s->devs[i].id))
            continue;
        if (running >= PROVISION_PARALLEL && reap_one(&running, &failed) != 0)
            return FM_EIO;
        pid_t pid = spawn_add(cfg, s->devs[i].id);
        if (pid < 0) {
            fprintf(stderr, "fleetml sim: fork: %s\n", strerror(errno));
            failed++;
            break;
        }
        running++;
        added++;
    }
    while (running > 0)
        if (reap_one(&running, &failed) != 0)
            return FM_EIO;
    if (added > 0 && !s->json)
        printf("provisioned %u device(s)\n", added - failed);
    return failed ? FM_EIO : 0;
}

/* ---- event loop plumbing -------------------------------------------------------- */

/* Brings the epoll registration of one device in line with its client. It
 * must run right after every call into that device's client: fd numbers
 * are reused by the kernel, so deferring it could delete another device's
 * registration for the same number. */
static void sync_reg(struct simdev *d)
{
    int fd = fm_devclient_fd(d->c);
    uint64_t epoch = fm_devclient_fd_epoch(d->c);
    uint32_t events = EPOLLIN | (fm_devclient_want_write(d->c) ? EPOLLOUT : 0);
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)(d - d->sim->devs)};
    if (fd != d->reg_fd || epoch != d->reg_epoch) {
        /* A closed fd has already left the epoll set; errors are expected. */
        if (d->reg_fd >= 0)
            (void)epoll_ctl(d->sim->ep, EPOLL_CTL_DEL, d->reg_fd, NULL);
        d->reg_fd = -1;
        d->reg_epoch = epoch;
        if (fd >= 0 && epoll_ctl(d->sim->ep, EPOLL_CTL_ADD, fd, &ev) == 0) {
            d->reg_fd = fd;
            d->reg_events = events;
        }
    } else if (fd >= 0 && events != d->reg_events) {
        if (epoll_ctl(d->sim->ep, EPOLL_CTL_MOD, fd, &ev) == 0)
            d->reg_events = events;
    }
}

/* Measurement ids have a fixed width so a pooled payload can be patched
 * in place. */
#define SEQ_DIGITS 12

static int build_pool(struct sim *s)
{
    if (s->pool_n == 0)
        return 0;
    s->pool = fm_calloc(s->pool_n, sizeof *s->pool);
    s->pool_len = fm_calloc(s->pool_n, sizeof *s->pool_len);
    s->pool_id_off = fm_calloc(s->pool_n, sizeof *s->pool_id_off);
    if (!s->pool || !s->pool_len || !s->pool_id_off)
        return FM_ENOMEM;
    char mid[FM_DEVICE_MEAS_ID_MAXLEN + 1];
    snprintf(mid, sizeof mid, "s-%s-%0*d", s->run_prefix, SEQ_DIGITS, 0);
    for (unsigned i = 0; i < s->pool_n; i++) {
        fm_visc_truth truth;
        fm_visc_draw_truth_shifted(&s->rng, s->hct_shift, &truth);
        int rc = fm_visc_measurement_json(&s->rng, &truth, mid, FIRMWARE, fm_wall_ms(),
                                          &s->pool[i], &s->pool_len[i]);
        if (rc)
            return rc;
        const char *at = memmem(s->pool[i], s->pool_len[i], mid, strlen(mid));
        if (!at)
            return FM_EINVAL;
        s->pool_id_off[i] = (size_t)(at - s->pool[i]) + strlen(mid) - SEQ_DIGITS;
    }
    return 0;
}

static void free_pool(struct sim *s)
{
    for (unsigned i = 0; s->pool && i < s->pool_n; i++)
        fm_free(s->pool[i]);
    fm_free(s->pool);
    fm_free(s->pool_len);
    fm_free(s->pool_id_off);
}

static int send_one(struct simdev *d)
{
    struct sim *s = d->sim;
    char mid[FM_DEVICE_MEAS_ID_MAXLEN + 1];
    unsigned long long seq = (unsigned long long)(d->seq + 1);
    snprintf(mid, sizeof mid, "s-%s-%0*llu", s->run_prefix, SEQ_DIGITS, seq);
    char *doc = NULL;
    size_t len = 0;
    int rc;
    if (s->pool_n) {
        /* The publish copies the payload, so patching the shared buffer
         * for each send is safe. */
        unsigned i = (unsigned)(fm_rng_next(&s->rng) % s->pool_n);
        memcpy(s->pool[i] + s->pool_id_off[i], mid + strlen(mid) - SEQ_DIGITS, SEQ_DIGITS);
        rc = fm_devclient_publish_measurement(d->c, s->pool[i], s->pool_len[i], mid);
    } else {
        fm_visc_truth truth;
        fm_visc_draw_truth_shifted(&s->rng, s->hct_shift, &truth);
        rc = fm_visc_measurement_json(&s->rng, &truth, mid, FIRMWARE, fm_wall_ms(), &doc, &len);
        if (rc == 0)
            rc = fm_devclient_publish_measurement(d->c, doc, len, mid);
        fm_free(doc);
    }
    if (rc == 0) {
        d->seq++;
        s->sent++;
    } else if (rc == FM_EBUSY) {
        s->skipped++;
    }
    return rc;
}

/* Closed loop: top the device up to W outstanding requests. */
static int fill_inflight(struct simdev *d)
{
    while (fm_devclient_ready(d->c) && fm_devclient_pending(d->c) < d->sim->inflight) {
        int rc = send_one(d);
        if (rc != 0)
            return rc == FM_EBUSY ? 0 : rc;
    }
    return 0;
}

static void on_result(void *ud, const char *mid, const char *status, const char *json, size_t len)
{
    (void)mid;
    (void)json;
    (void)len;
    struct simdev *d = ud;
    struct sim *s = d->sim;
    fm_devclient_result_info info = {0};
    (void)fm_devclient_result_info_get(d->c, &info);
    if (strcmp(status, "timeout") == 0) {
        s->timeouts++;
    } else {
        if (strcmp(status, "ok") == 0)
            s->ok++;
        else
            s->errors++;
        fm_lathist_record(&s->hist, info.latency_ns);
        fm_lathist_record(&s->window, info.latency_ns);
        s->window_results++;
    }
    /* Sending from inside the callback keeps the closed loop tight; an
     * allocation failure here just leaves the slot for the next tick. */
    if (s->inflight && s->sending)
        (void)fill_inflight(d);
}

static void on_state(void *ud, bool connected, const char *reason)
{
    struct simdev *d = ud;
    if (connected && !d->announced && d->sim->claim) {
        d->announced = true;
        if (!d->sim->json) {
            printf("%s: connected as %s\n", d->id, fm_devclient_id(d->c));
            fflush(stdout);
        }
    }
    if (!connected && fm_devclient_error(d->c) && !d->failed) {
        d->failed = true;
        fprintf(stderr, "fleetml sim: %s: %s\n", d->id, reason);
    }
}

static unsigned count_ready(const struct sim *s)
{
    unsigned n = 0;
    for (unsigned i = 0; i < s->n_devices; i++)
        n += fm_devclient_ready(s->devs[i].c);
    return n;
}

static size_t count_pending(const struct sim *s)
{
    size_t n = 0;
    for (unsigned i = 0; i < s->n_devices; i++)
        n += fm_devclient_pending(s->devs[i].c);
    return n;
}

static double ms(uint64_t ns) { return (double)ns / 1e6; }

static void print_progress(struct sim *s, double t, double window_s)
{
    printf("t=%.0fs connected=%u/%u sent=%llu ok=%llu errors=%llu timeouts=%llu skipped=%llu "
           "rate=%.1f/s p50=%.1fms p99=%.1fms\n",
           t, s->n_ready, s->n_devices, (unsigned long long)s->sent, (unsigned long long)s->ok,
           (unsigned long long)s->errors, (unsigned long long)s->timeouts,
           (unsigned long long)s->skipped,
           window_s > 0 ? (double)s->window_results / window_s : 0.0,
           ms(fm_lathist_quantile(&s->window, 0.50)), ms(fm_lathist_quantile(&s->window, 0.99)));
    fflush(stdout);
    fm_lathist_reset(&s->window);
    s->window_results = 0;
}

static void print_summary(struct sim *s, double duration_s, unsigned connected, uint64_t reconnects)
{
    double tput = duration_s > 0 ? (double)(s->ok + s->errors) / duration_s : 0.0;
    size_t pending = count_pending(s);
    if (s->json) {
        printf("{\"devices\":%u,\"connected\":%u,\"sent\":%llu,\"ok\":%llu,\"errors\":%llu,"
               "\"timeouts\":%llu,\"throughput_per_s\":%.3f,\"latency_ms\":{\"p50\":%.3f,"
               "\"p99\":%.3f,\"p999\":%.3f,\"max\":%.3f},\"duration_s\":%.3f,\"skipped\":%llu,"
               "\"pending\":%zu,\"reconnects\":%llu,\"all_connected_s\":%.3f}\n",
               s->n_devices, connected, (unsigned long long)s->sent, (unsigned long long)s->ok,
               (unsigned long long)s->errors, (unsigned long long)s->timeouts, tput,
               ms(fm_lathist_quantile(&s->hist, 0.50)), ms(fm_lathist_quantile(&s->hist, 0.99)),
               ms(fm_lathist_quantile(&s->hist, 0.999)), ms(s->hist.max_ns), duration_s,
               (unsigned long long)s->skipped, pending, (unsigned long long)reconnects,
               s->all_connected_ns ? (double)(s->all_connected_ns - s->started_ns) / 1e9 : -1.0);
    } else {
        printf("summary: devices=%u connected=%u sent=%llu ok=%llu errors=%llu timeouts=%llu "
               "skipped=%llu pending=%zu reconnects=%llu\n",
               s->n_devices, connected, (unsigned long long)s->sent, (unsigned long long)s->ok,
               (unsigned long long)s->errors, (unsigned long long)s->timeouts,
               (unsigned long long)s->skipped, pending, (unsigned long long)reconnects);
        printf("summary: duration=%.1fs throughput=%.1f results/s latency_ms p50=%.2f p99=%.2f "
               "p999=%.2f max=%.2f\n",
               duration_s, tput, ms(fm_lathist_quantile(&s->hist, 0.50)),
               ms(fm_lathist_quantile(&s->hist, 0.99)), ms(fm_lathist_quantile(&s->hist, 0.999)),
               ms(s->hist.max_ns));
    }
    fflush(stdout);
}

static void raise_fd_limit(unsigned n_devices)
{
    /* Each device holds a TCP socket plus libmosquitto's internal socket
     * pair, so large fleets exceed the usual soft limit of 1024. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return;
    rlim_t need = (rlim_t)n_devices * 3 + 64;
    if (rl.rlim_cur < need && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = need < rl.rlim_max ? need : rl.rlim_max;
        (void)setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < need)
        fprintf(stderr, "fleetml sim: warning: open-file limit %llu may be too low for %u devices\n",
                (unsigned long long)rl.rlim_cur, n_devices);
}


/* ---- the run -------------------------------------------------------------------- */

static int create_claim_devices(const fm_config *cfg, struct sim *s, const char *ca)
{
    char rel[512], crt[PATH_MAX], key[PATH_MAX];
    snprintf(rel, sizeof rel, "claims/%s/claim.crt", s->claim);
    if (!fm_config_path(cfg, rel, crt, sizeof crt))
        return FM_EINVAL;
    snprintf(rel, sizeof rel, "claims/%s/claim.key", s->claim);
    if (!fm_config_path(cfg, rel, key, sizeof key))
        return FM_EINVAL;
    if (access(crt, R_OK) != 0 || access(key, R_OK) != 0) {
        fprintf(stderr, "fleetml sim: no claim certificate for template '%s' in %s/claims/%s "
                        "(run `fleetml template claim-cert %s`)\n",
                s->claim, cfg->data_dir, s->claim, s->claim);
        return FM_ENOTFOUND;
    }
    for (unsigned i = 0; i < s->n_devices; i++) {
        struct simdev *d = &s->devs[i];
        char state[PATH_MAX];
        snprintf(rel, sizeof rel, "sim/%s", d->id); /* d->id holds the serial */
        if (!fm_config_path(cfg, rel, state, sizeof state))
            return FM_EINVAL;
        fm_devclient_claim claim = {
            .cert_path = crt,
            .key_path = key,
            .serial = d->id,
            .model = "fleetml-sim-viscometer",
            .firmware = FIRMWARE,
        };
        int cap = FM_OUTBOX_DEFAULT_MAX_ENTRIES;
        if ((int)s->inflight > cap)
            cap = (int)s->inflight;
        fm_devclient_opts o = {
            .host = cfg->broker_host,
            .port = cfg->broker_port,
            .ca_path = ca,
            .on_result = on_result,
            .on_state = on_state,
            .ud = d,
            .result_timeout_ms = (int)(s->timeout_s * 1000.0),
            .state_dir = state,
            .claim = &claim,
            .outbox_max_entries = cap,
        };
        fm_errbuf err;
        int rc = fm_devclient_new(&o, &d->c, &err);
        if (rc != 0) {
            fprintf(stderr, "fleetml sim: %s: %s\n", d->id, err.msg);
            return rc;
        }
    }
    return 0;
}

static int create_devices(const fm_config *cfg, struct sim *s)
{
    char ca[PATH_MAX];
    if (!fm_config_path(cfg, "pki/ca.crt", ca, sizeof ca))
        return FM_EINVAL;
    if (s->claim)
        return create_claim_devices(cfg, s, ca);
    for (unsigned i = 0; i < s->n_devices; i++) {
        struct simdev *d = &s->devs[i];
        char rel[256], crt[PATH_MAX], key[PATH_MAX];
        snprintf(rel, sizeof rel, "devices/%s/device.crt", d->id);
        if (!fm_config_path(cfg, rel, crt, sizeof crt))
            return FM_EINVAL;
        snprintf(rel, sizeof rel, "devices/%s/device.key", d->id);
        if (!fm_config_path(cfg, rel, key, sizeof key))
            return FM_EINVAL;
        int pending_cap = FM_DEVCLIENT_DEFAULT_MAX_PENDING;
        if ((int)s->inflight > pending_cap)
            pending_cap = (int)s->inflight;
        fm_devclient_opts o = {
            .id = d->id,
            .host = cfg->broker_host,
            .port = cfg->broker_port,
            .ca_path = ca,
            .cert_path = crt,
            .key_path = key,
            .on_result = on_result,
            .ud = d,
            .result_timeout_ms = (int)(s->timeout_s * 1000.0),
            .max_pending = pending_cap,
        };
        fm_errbuf err;
        int rc = fm_devclient_new(&o, &d->c, &err);
        if (rc != 0) {
            fprintf(stderr, "fleetml sim: %s\n", err.msg);
            return rc;
        }
    }
    return 0;
}

/* ---- timers ----------------------------------------------------------------------- */

static bool heap_less(const struct sim *s, uint32_t a, uint32_t b)
{
    return s->devs[a].due_ns < s->devs[b].due_ns;
}

static void heap_set(struct sim *s, uint32_t pos, uint32_t dev)
{
    s->heap[pos] = dev;
    s->devs[dev].heap_pos = (int32_t)pos;
}

static void heap_up(struct sim *s, uint32_t pos)
{
    uint32_t dev = s->heap[pos];
    while (pos > 0) {
        uint32_t parent = (pos - 1) / 2;
        if (!heap_less(s, dev, s->heap[parent]))
            break;
        heap_set(s, pos, s->heap[parent]);
        pos = parent;
    }
    heap_set(s, pos, dev);
}

static void heap_down(struct sim *s, uint32_t pos)
{
    uint32_t dev = s->heap[pos];
    for (;;) {
        uint32_t child = 2 * pos + 1;
        if (child >= s->heap_n)
            break;
        if (child + 1 < s->heap_n && heap_less(s, s->heap[child + 1], s->heap[child]))
            child++;
        if (!heap_less(s, s->heap[child], dev))
            break;
        heap_set(s, pos, s->heap[child]);
        pos = child;
    }
    heap_set(s, pos, dev);
}

/* Sets a device's heap key (inserting it when not queued yet). */
static void schedule(struct simdev *d, uint64_t due)
{
    struct sim *s = d->sim;
    uint32_t idx = (uint32_t)(d - s->devs);
    if (d->heap_pos < 0) {
        d->due_ns = due;
        heap_set(s, s->heap_n++, idx);
        heap_up(s, s->heap_n - 1);
        return;
    }
    uint64_t old = d->due_ns;
    d->due_ns = due;
    if (due < old)
        heap_up(s, (uint32_t)d->heap_pos);
    else if (due > old)
        heap_down(s, (uint32_t)d->heap_pos);
}

/* Bookkeeping after every call into a device's client (socket event,
 * timer, send): readiness counters, the closed loop's top-up, the open
 * loop's send schedule, the epoll registration and the next timer. O(1)
 * (plus O(log n) for the heap), so the loop's cost follows events and due
 * timers, not the size of the fleet. misc_ran says whether
 * fm_devclient_loop_misc() was just called: otherwise the misc deadline
 * can only move earlier, so a device busy with socket traffic still gets
 * its housekeeping (keepalive pings live in libmosquitto's misc). */
static int touched(struct simdev *d, uint64_t now, bool misc_ran)
{
    struct sim *s = d->sim;
    int rc = 0;
    bool r = fm_devclient_ready(d->c);
    if (r != d->ready) {
        d->ready = r;
        if (r)
            s->n_ready++;
        else
            s->n_ready--;
        if (r && !d->ever_ready) {
            d->ever_ready = true;
            s->n_ever_ready++;
        }
    }
    /* The ramp limits first attempts in progress; one ends when the
     * device is ready or its socket is gone (backoff, failure). */
    if (!d->first_done && (d->ever_ready || fm_devclient_fd(d->c) < 0)) {
        d->first_done = true;
        s->n_first_done++;
    }
    if (r && s->sending) {
        if (s->inflight) {
            rc = fill_inflight(d);
        } else if (!d->started) {
            /* A random phase spreads the fleet's sends over the interval
             * instead of synchronising them. */
            d->started = true;
            d->next_send_ns = now + (uint64_t)(fm_rng_uniform(&s->rng) * (double)s->interval_ns);
        }
    }
    sync_reg(d);
    int t = fm_devclient_next_timeout_ms(d->c);
    if (t < 1)
        t = 1; /* due now: next pass (keeps one timer pass finite) */
    uint64_t misc = now + (uint64_t)t * NS_PER_MS;
    if (misc_ran || misc < d->misc_ns)
        d->misc_ns = misc;
    uint64_t due = d->misc_ns;
    if (!s->inflight && s->sending && d->started && d->next_send_ns < due)
        due = d->next_send_ns;
    schedule(d, due);
    if (rc != 0 && rc != FM_EBUSY) {
        fprintf(stderr, "fleetml sim: %s: cannot send: %s\n", d->id, fm_strerror(rc));
        return rc;
    }
    return 0;
}

/* Runs the timers that are due: open-loop sends and the clients' own
 * housekeeping (keepalive, result timeouts and re-publishing, reconnect
 * backoff, connect nudges and deadlines). */
static int run_timers(struct sim *s, uint64_t now)
{
    while (s->heap_n > 0) {
        struct simdev *d = &s->devs[s->heap[0]];
        if (d->due_ns > now)
            break;
        if (!s->inflight && s->sending && d->started && now >= d->next_send_ns) {
            int rc = send_one(d);
            sync_reg(d);
            if (rc != 0 && rc != FM_EBUSY) {
                fprintf(stderr, "fleetml sim: %s: cannot send: %s\n", d->id, fm_strerror(rc));
                return rc;
            }
            d->next_send_ns += s->interval_ns;
            if (d->next_send_ns <= now)
                d->next_send_ns = now + s->interval_ns; /* no catch-up bursts */
        }
        bool misc = now >= d->misc_ns;
        if (misc) {
            int rc = fm_devclient_loop_misc(d->c);
            if (rc != 0) {
                sync_reg(d);
                fprintf(stderr, "fleetml sim: %s: %s\n", d->id, fm_strerror(rc));
                return rc;
            }
        }
        int rc = touched(d, now, misc);
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* Starts the connections the ramp allows by now. */
static int ramp(struct sim *s, uint64_t now, unsigned *next_connect)
{
    /* TLS handshakes cost CPU on both sides; on a small machine an
     * unthrottled ramp starves the broker and the platform, so the caller
     * may cap the rate. */
    uint64_t budget = s->connect_rate > 0
                          ? 1 + (uint64_t)((double)(now - s->started_ns) / 1e9 * s->connect_rate)
                          : CONNECTS_PER_TICK +
                                (now - s->started_ns) / (CONNECT_TICK_NS / CONNECTS_PER_TICK);
    while (*next_connect < s->n_devices && *next_connect < budget) {
        /* First attempts still in progress (counted by touched()). */
        if (*next_connect - s->n_first_done >= MAX_CONNECTING)
            break;
        struct simdev *d = &s->devs[(*next_connect)++];
        fm_errbuf err;
        int rc = fm_devclient_connect(d->c, &err);
        if (rc == FM_ECRYPTO && !s->claim) {
            fprintf(stderr, "fleetml sim: %s\n", err.msg);
            return rc;
        }
        if (rc != 0 && rc != FM_EIO && s->claim) {
            /* One device that cannot even start its claim (e.g. no space
             * for its key) does not stop the others. */
            fprintf(stderr, "fleetml sim: %s: %s\n", d->id, err.msg);
            d->failed = true;
        }
        /* FM_EIO: unreachable for now; the client retries by itself. */
        rc = touched(d, now, true);
        if (rc != 0)
            return rc;
    }
    return 0;
}

static int run_loop(struct sim *s)
{
    const uint64_t start = fm_mono_ns();
    s->started_ns = start;
    const uint64_t end = s->duration_s > 0 ? start + (uint64_t)(s->duration_s * 1e9) : UINT64_MAX;
    s->interval_ns = s->rate > 0 ? (uint64_t)(1e9 / s->rate) : 0;
    uint64_t drain_until = 0, next_drain_check = 0, next_progress = start + PROGRESS_PERIOD_NS;
    uint64_t last_progress = start;
    unsigned next_connect = 0;
    struct epoll_event evs[256];
    s->heap = fm_calloc(s->n_devices, sizeof *s->heap);
    if (!s->heap) {
        fprintf(stderr, "fleetml sim: out of memory\n");
        return FM_ENOMEM;
    }
    for (unsigned i = 0; i < s->n_devices; i++) {
        s->devs[i].heap_pos = -1;
        s->devs[i].misc_ns = UINT64_MAX;
    }
    s->sending = true;

    uint64_t next_ramp_shown = 0;
    for (;;) {
        uint64_t now = fm_mono_ns();
        if (s->sending && (signals_seen > 0 || now >= end)) {
            s->sending = false;
            drain_until = now + (uint64_t)(s->drain_s * 1e9);
            next_drain_check = now;
        }
        if (!s->sending) {
            if (signals_seen > 1 || now >= drain_until)
                break;
            /* count_pending() is O(devices): a few times per second only. */
            if (now >= next_drain_check) {
                if (count_pending(s) == 0)
                    break;
                next_drain_check = now + DRAIN_CHECK_NS;
            }
        }

        int rc = ramp(s, now, &next_connect);
        if (rc != 0)
            return rc;
        /* Ramp-up on a terminal: how many devices are connected so far. */
        if (!s->json && !s->all_connected_ns && now >= next_ramp_shown) {
            fm_cli_progress("devices connected",
                            (int)((uint64_t)s->n_ready * 100 / s->n_devices));
            next_ramp_shown = now + RAMP_SHOW_NS;
        }
        if (!s->all_connected_ns && s->n_ready == s->n_devices) {
            s->all_connected_ns = now;
            if (!s->json)
                fm_cli_progress("devices connected", 100);
        }

        rc = run_timers(s, now);
        if (rc != 0)
            return rc;

        if (!s->json && now >= next_progress) {
            print_progress(s, (double)(now - start) / 1e9, (double)(now - last_progress) / 1e9);
            last_progress = now;
            next_progress = now + PROGRESS_PERIOD_NS;
        }

        /* Sleep until the next timer (rounded up to whole ms so the wake-up
         * is never early), at most a second. */
        now = fm_mono_ns();
        uint64_t wake = now + NS_PER_S;
        if (s->heap_n > 0 && s->devs[s->heap[0]].due_ns < wake)
            wake = s->devs[s->heap[0]].due_ns;
        if (s->sending && end < wake)
            wake = end;
        if (!s->json && next_progress < wake)
            wake = next_progress;
        if (!s->sending) {
            if (drain_until < wake)
                wake = drain_until;
            if (next_drain_check < wake)
                wake = next_drain_check;
        }
        int timeout_ms = wake <= now ? 0 : (int)((wake - now + NS_PER_MS - 1) / NS_PER_MS);
        if (next_connect < s->n_devices && timeout_ms > RAMP_WAKE_MS)
            timeout_ms = RAMP_WAKE_MS;
        int n = epoll_wait(s->ep, evs, (int)(sizeof evs / sizeof evs[0]), timeout_ms);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "fleetml sim: epoll_wait: %s\n", strerror(errno));
            return FM_EIO;
        }
        now = fm_mono_ns();
        for (int i = 0; i < n; i++) {
            struct simdev *d = &s->devs[evs[i].data.u32];
            int fd = d->reg_fd;
            rc = 0;
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                rc = fm_devclient_loop_read(d->c);
            if (rc == 0 && (evs[i].events & EPOLLOUT) && fm_devclient_fd(d->c) == fd)
                rc = fm_devclient_loop_write(d->c);
            if (rc != 0) {
                sync_reg(d);
                fprintf(stderr, "fleetml sim: %s: %s\n", d->id, fm_strerror(rc));
                return rc;
            }
            rc = touched(d, now, false);
            if (rc != 0)
                return rc;
        }
    }
    return 0;
}

int fm_cmd_sim(int argc, char **argv)
{
    if (fm_cli_take_flag(&argc, argv, "--help") || fm_cli_take_flag(&argc, argv, "-h")) {
        usage();
        return 0;
    }
    struct sim s;
    memset(&s, 0, sizeof s);
    int rc = parse_args(&argc, argv, &s);
    if (rc != 0) {
        usage();
        return rc;
    }
    fm_config cfg;
    rc = fm_cli_config(&argc, argv, &cfg);
    if (rc != 0)
        return rc;
    if (argc > 1) {
        fprintf(stderr, "fleetml sim: unexpected argument '%s'\n", argv[1]);
        usage();
        return 2;
    }

    int exit_code = 1;
    s.ep = -1;
    s.devs = fm_calloc(s.n_devices, sizeof *s.devs);
    if (!s.devs) {
        fprintf(stderr, "fleetml sim: out of memory\n");
        return 1;
    }
    for (unsigned i = 0; i < s.n_devices; i++) {
        s.devs[i].sim = &s;
        s.devs[i].reg_fd = -1;
        if (s.claim)
            snprintf(s.devs[i].id, sizeof s.devs[i].id, "SIM-%04u", i + 1);
        else
            snprintf(s.devs[i].id, sizeof s.devs[i].id, "%s-%04u", s.prefix, i + 1);
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (s.provision && provision(&cfg, &s) != 0) {
        fprintf(stderr, "fleetml sim: provisioning failed (see messages above)\n");
        goto out;
    }
    unsigned missing = 0;
    for (unsigned i = 0; i < s.n_devices && !s.claim; i++) {
        if (!has_credentials(&cfg, s.devs[i].id)) {
            if (missing++ == 0)
                fprintf(stderr, "fleetml sim: no credentials for %s in %s/devices "
                                "(add the devices, or pass --provision)\n",
                        s.devs[i].id, cfg.data_dir);
        }
    }
    if (missing > 0) {
        if (missing > 1)
            fprintf(stderr, "fleetml sim: %u device(s) lack credentials\n", missing);
        goto out;
    }
    raise_fd_limit(s.n_devices);
    s.ep = epoll_create1(EPOLL_CLOEXEC);
    if (s.ep < 0) {
        fprintf(stderr, "fleetml sim: epoll_create1: %s\n", strerror(errno));
        goto out;
    }
    if (create_devices(&cfg, &s) != 0)
        goto out;
    fm_rng_seed(&s.rng, s.seed);
    fm_cli_base36((uint64_t)fm_wall_ms(), s.run_prefix, sizeof s.run_prefix);
    if (build_pool(&s) != 0) {
        fprintf(stderr, "fleetml sim: cannot build the payload pool\n");
        exit_code = 1;
        goto out;
    }

    if (!s.json) {
        if (s.inflight)
            printf("sim: %u devices, closed loop with %u in flight each\n", s.n_devices, s.inflight);
        else
            printf("sim: %u devices at %g measurements/s each (%g/s total)\n", s.n_devices, s.rate,
                   s.rate * s.n_devices);
        fflush(stdout);
    }
    uint64_t t0 = fm_mono_ns();
    rc = run_loop(&s);
    double duration_s = (double)(fm_mono_ns() - t0) / 1e9;
    unsigned connected = count_ready(&s);
    uint64_t reconnects = 0;
    for (unsigned i = 0; i < s.n_devices; i++) {
        fm_devclient_stats st;
        fm_devclient_get_stats(s.devs[i].c, &st);
        if (st.connects > 1)
            reconnects += st.connects - 1;
    }
    print_summary(&s, duration_s, connected, reconnects);
    exit_code = rc == 0 ? 0 : 1;

out:
    free_pool(&s);
    for (unsigned i = 0; i < s.n_devices; i++)
        fm_devclient_free(s.devs[i].c);
    fm_free(s.devs);
    fm_free(s.heap);
    if (s.ep >= 0)
        close(s.ep);
    return exit_code;
}

const fm_cli_cmd fm_cli_sim_cmds[] = {
    {.name = "sim",
     .summary = "run many simulated devices against a running node",
     .text = "Open loop with --rate, closed loop with --inflight. Prints a summary (and with\n"
             "--json one JSON line) of replies and their latency.",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--devices", "N", "how many devices (required)"},
              {"--rate", "R", "measurements per second per device (e.g. 0.1)"},
              {"--inflight", "W", "closed loop: keep W requests in flight per device"},
              {"--prefix", "P", "device ids <P>-0001... (default sim)"},
              {"--duration", "SECONDS", "stop after this long"},
              {"--seed", "S", "the sweeps' seed"},
              {"--payload-pool", "N", "reuse N pre-generated sweeps (cheap load)"},
              {"--timeout", "SECONDS", "result wait per measurement"},
              {"--drain", "SECONDS", "wait this long for the last replies"},
              {"--connect-rate", "C", "open at most C new connections per second"},
              {"--hct-shift", "POINTS", "shift the simulated hematocrit (-45..45)"},
              {"--claim", "TEMPLATE", "onboard each device by claim (serials SIM-0001...)"},
              {"--provision", NULL, "add devices that have no credentials yet"},
              {"--json", NULL, "the summary as one JSON line"}},
     .examples = {"fleetml sim --devices 20 --rate 1 --duration 60 --provision",
                  "fleetml sim --devices 50 --inflight 4 --duration 30 --json"}},
    {.name = NULL},
};
