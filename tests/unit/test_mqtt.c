/*
 * Unit tests for the service's MQTT client (src/mqtt/client.c) that need no
 * broker: the reconnect backoff policy, and a broker address that drops
 * SYNs (a listener whose accept queue is full), which must hold up neither
 * publishers nor shutdown, and the two-step shutdown (halt while others
 * publish, then free). Talking to a real broker is covered by the
 * integration suite.
 */
#include "fleetml/config.h"
#include "fleetml/mqtt.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void test_backoff_policy(void **state)
{
    (void)state;
    /* Failed attempts double, up to the cap. */
    assert_int_equal(fm_mqtt_backoff_next(100, 0), 200);
    assert_int_equal(fm_mqtt_backoff_next(200, 0), 400);
    assert_int_equal(fm_mqtt_backoff_next(1600, 0), FM_MQTT_BACKOFF_MAX_MS);
    assert_int_equal(fm_mqtt_backoff_next(FM_MQTT_BACKOFF_MAX_MS, 0), FM_MQTT_BACKOFF_MAX_MS);
    /* Accepted but short-lived (a refused session, a client id taken over
     * by another process): still doubling. */
    assert_int_equal(fm_mqtt_backoff_next(800, 50), 1600);
    assert_int_equal(fm_mqtt_backoff_next(800, FM_MQTT_STABLE_MS - 1), 1600);
    /* A connection that lasted starts again from the minimum. */
    assert_int_equal(fm_mqtt_backoff_next(FM_MQTT_BACKOFF_MAX_MS, FM_MQTT_STABLE_MS),
                     FM_MQTT_BACKOFF_MIN_MS);
    assert_int_equal(fm_mqtt_backoff_next(0, 0), FM_MQTT_BACKOFF_MIN_MS);
}

/* A non-blocking connect to addr; returns the socket. */
static int connect_nb(const struct sockaddr_in *addr)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    assert_true(fd >= 0);
    int rc = connect(fd, (const struct sockaddr *)addr, sizeof *addr);
    assert_true(rc == 0 || errno == EINPROGRESS);
    return fd;
}

static int connected_within(int fd, int ms)
{
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    if (poll(&p, 1, ms) != 1)
        return 0;
    int soerr = -1;
    socklen_t len = sizeof soerr;
    return getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) == 0 && soerr == 0;
}

static void touch(const char *dir, const char *name)
{
    char path[PATH_MAX];
    int n = snprintf(path, sizeof path, "%s/%s", dir, name);
    assert_true(n > 0 && (size_t)n < sizeof path);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs("placeholder\n", f);
    fclose(f);
}

static void on_message(void *ud, const fm_mqtt_msg *m)
{
    (void)ud;
    (void)m;
}

/* Publishes until told to stop, counting answers other than FM_EUNAVAIL. */
typedef struct hammer {
    fm_mqtt *c;
    atomic_int stop;
    atomic_long calls, other;
} hammer;

static void *publish_until(void *arg)
{
    hammer *hm = arg;
    while (!atomic_load(&hm->stop)) {
        if (fm_mqtt_publish(hm->c, "fleet/d/results", "{}", 2, "id", 2) != FM_EUNAVAIL)
            atomic_fetch_add(&hm->other, 1);
        atomic_fetch_add(&hm->calls, 1);
    }
    return NULL;
}

/* Waits (up to 30 s: the bound only catches a thread that never runs)
 * until the publishing thread has made more than `past` calls. */
static int calls_pass(hammer *hm, long past)
{
    for (int i = 0; i < 30000; i++) {
        if (atomic_load(&hm->calls) > past)
            return 1;
        struct timespec ts = {0, 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return 0;
}

static void test_blackholed_broker_holds_up_nobody(void **state)
{
    (void)state;
    /* A listener that never accepts, its queue filled: further SYNs are
     * dropped and a blocking connect() would wait for the kernel's SYN
     * retries (about two minutes). */
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(lfd >= 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(lfd, (struct sockaddr *)&addr, sizeof addr), 0);
    socklen_t alen = sizeof addr;
    assert_int_equal(getsockname(lfd, (struct sockaddr *)&addr, &alen), 0);
    assert_int_equal(listen(lfd, 0), 0);
    int fill[8], nfill = 0, probe = -1;
    while (nfill < 8) {
        int fd = connect_nb(&addr);
        if (!connected_within(fd, 300)) {
            probe = fd;
            break;
        }
        fill[nfill++] = fd;
    }
    if (probe < 0)
        skip(); /* this kernel answers every SYN: no black hole to test */
    close(probe);

    char dir[] = "/tmp/fm-test-mqtt-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char pki[PATH_MAX], url[64];
    snprintf(pki, sizeof pki, "%s/pki", dir);
    assert_int_equal(mkdir(pki, 0700), 0);
    touch(pki, "ca.crt");
    touch(pki, "service.crt");
    touch(pki, "service.key");
    fm_config cfg;
    fm_errbuf err;
    assert_int_equal(fm_config_defaults(&cfg, dir), 0);
    snprintf(url, sizeof url, "mqtts://127.0.0.1:%d", ntohs(addr.sin_port));
    assert_int_equal(fm_config_set(&cfg, "broker.mode", "external", &err), 0);
    assert_int_equal(fm_config_set(&cfg, "broker.url", url, &err), 0);
    const char *subs[] = {"fleet/+/measurements", NULL};
    fm_mqtt_handlers h = {.on_message = on_message};
    fm_mqtt *c = NULL;
    assert_int_equal(fm_mqtt_start(&cfg, subs, &h, &c, &err), 0);

    /* Whatever the network thread is doing (connecting, waiting to retry),
     * a publish answers at once. Bounds are generous: the failure they
     * catch is a wait of minutes. */
    for (int i = 0; i < 20; i++) {
        double t0 = now_s();
        assert_int_equal(fm_mqtt_publish(c, "fleet/d/results", "{}", 2, "id", 2), FM_EUNAVAIL);
        double took = now_s() - t0;
        assert_true(took < 1.0);
        assert_int_equal(fm_mqtt_connected(c), 0);
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL); /* spreads the calls over the connect attempt */
    }
    /* Shutdown in two steps, as fm_cmd_serve does it: halt while another
     * thread keeps publishing, then free once that thread is done. */
    hammer hm = {.c = c};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, publish_until, &hm), 0);
    assert_true(calls_pass(&hm, 0)); /* publishing before the halt */
    double t0 = now_s();
    fm_mqtt_halt(c);
    double took = now_s() - t0;
    print_message("halt took %.3f s\n", took);
    assert_true(took < 3.0);
    assert_true(calls_pass(&hm, atomic_load(&hm.calls))); /* and after it */
    atomic_store(&hm.stop, 1);
    assert_int_equal(pthread_join(th, NULL), 0);
    assert_int_equal(atomic_load(&hm.other), 0);
    assert_int_equal(fm_mqtt_publish(c, "fleet/d/results", "{}", 2, NULL, 0), FM_EUNAVAIL);
    assert_int_equal(fm_mqtt_connected(c), 0);
    fm_mqtt_halt(c); /* again: nothing left to do */
    fm_mqtt_stop(c);

    for (int i = 0; i < nfill; i++)
        close(fill[i]);
    close(lfd);
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_backoff_policy),
        cmocka_unit_test(test_blackholed_broker_holds_up_nobody),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
