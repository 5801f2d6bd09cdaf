/* `fleetml status`: a running node at a glance, from its operations
 * endpoint (GET /status on ops.bind:ops.port). */
#include "cli/cli.h"

#include <curl/curl.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STATUS_MAX (4u << 20)

typedef struct body {
    char *data;
    size_t len;
} body;

static size_t on_data(char *p, size_t size, size_t n, void *ud)
{
    body *b = ud;
    size_t add = size * n;
    if (b->len + add > STATUS_MAX)
        return 0;
    char *d = realloc(b->data, b->len + add + 1);
    if (!d)
        return 0;
    memcpy(d + b->len, p, add);
    b->data = d;
    b->len += add;
    d[b->len] = '\0';
    return add;
}

/* GETs url; 0 and the body, or 1 with the reason printed. */
static int fetch(const char *url, body *out)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
    CURL *c = curl_easy_init();
    if (!c) {
        fprintf(stderr, "fleetml status: out of memory\n");
        return 1;
    }
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, out);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 10000L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http");
    CURLcode rc = curl_easy_perform(c);
    long code = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
    curl_easy_cleanup(c);
    if (rc != CURLE_OK) {
        fprintf(stderr, "fleetml status: no node answers at %s (%s); is `fleetml serve` running "
                        "with this data directory?\n",
                url, curl_easy_strerror(rc));
        return 1;
    }
    if (code != 200) {
        fprintf(stderr, "fleetml status: %s answered HTTP %ld\n", url, code);
        return 1;
    }
    return 0;
}

static const char *str(json_t *o, const char *k)
{
    const char *v = json_string_value(json_object_get(o, k));
    return v && *v ? v : "-";
}

static long long num(json_t *o, const char *k)
{
    return (long long)json_integer_value(json_object_get(o, k));
}

static void latency(const char *label, json_t *v)
{
    if (json_is_number(v))
        printf(" %s %.3g ms", label, json_number_value(v));
    else
        printf(" %s -", label);
}

static void print_status(json_t *s)
{
    json_t *br = json_object_get(s, "broker"), *pl = json_object_get(s, "pipeline"),
           *lk = json_object_get(s, "lake"), *md = json_object_get(s, "model");
    printf("node       %s, fleetml %s, at %s\n", str(s, "node"), str(s, "version"),
           str(s, "time"));
    if (json_is_true(json_object_get(br, "up")))
        printf("broker     up");
    else
        printf("broker     DOWN");
    if (num(br, "pid") > 0)
        printf(", pid %lld", num(br, "pid"));
    printf(", %lld devices connected to it", num(br, "devices_connected"));
    printf("; service %s to it\n",
           json_is_true(json_object_get(br, "mqtt_connected")) ? "connected" : "NOT connected");
    printf("store      %s\n", json_is_true(json_object_get(s, "store_ok")) ? "ok" : "FAILING");
    printf("model      %s\n", str(md, "serving"));
    json_t *devs = json_object_get(s, "devices");
    if (!json_is_object(devs))
        printf("devices    (the store could not be read)\n");
    else if (json_object_size(devs) == 0)
        printf("devices    none yet\n");
    const char *tenant;
    json_t *c;
    bool first = true;
    json_object_foreach(devs, tenant, c) {
        printf("%s %s: %lld online, %lld offline", first ? "devices   " : "          ", tenant,
               num(c, "online"), num(c, "offline"));
        if (num(c, "inactive"))
            printf(", %lld disabled or revoked", num(c, "inactive"));
        printf("\n");
        first = false;
    }
    printf("pipeline   queue %lld; %lld received, %lld stored, %lld replied; %lld commit "
           "failures\n",
           num(pl, "queue"), num(pl, "received"), num(pl, "stored"), num(pl, "replied"),
           num(pl, "commit_failures"));
    json_t *rm = json_object_get(pl, "reply_ms");
    printf("replies   ");
    latency("p50", json_object_get(rm, "p50"));
    latency("p99", json_object_get(rm, "p99"));
    latency("p99.9", json_object_get(rm, "p999"));
    printf(" over the last %.0f s;", json_number_value(json_object_get(rm, "window_s")));
    latency("slowest since start", json_object_get(rm, "max_since_start"));
    printf("\n");
    printf("lake       backlog %lld rows, %s, %lld errors\n", num(lk, "backlog"),
           json_is_true(json_object_get(lk, "exporting")) ? "exported by this node"
                                                          : "exported by another node",
           num(lk, "errors"));
    json_t *certs = json_object_get(s, "certificates");
    for (size_t i = 0; i < json_array_size(certs); i++) {
        json_t *ct = json_array_get(certs, i);
        printf("%s %-8s ", i ? "          " : "certs     ", str(ct, "name"));
        if (json_is_null(json_object_get(ct, "not_after")))
            printf("cannot be read (%s)", str(ct, "file"));
        else
            printf("ends %s (%lld days)", str(ct, "not_after"), num(ct, "days_left"));
        printf("%s\n", json_is_true(json_object_get(ct, "warn")) ? "  WARNING: renew it" : "");
    }
}

int fm_cmd_status(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    bool as_json = fm_cli_take_flag(&argc, argv, "--json");
    const char *url_opt = fm_cli_take_opt(&argc, argv, "--url");
    if (argc != 1)
        return fm_cli_usage_error("status", "unexpected argument '%s'", argv[1]);
    char url[256];
    if (url_opt)
        snprintf(url, sizeof url, "%s/status", url_opt);
    else {
        const char *host = cfg.ops_bind;
        if (strcmp(host, "0.0.0.0") == 0 || strcmp(host, "") == 0)
            host = "127.0.0.1";
        else if (strcmp(host, "::") == 0)
            host = "::1";
        bool v6 = strchr(host, ':') != NULL;
        snprintf(url, sizeof url, "http://%s%s%s:%d/status", v6 ? "[" : "", host, v6 ? "]" : "",
                 cfg.ops_port);
    }
    body b = {0};
    if (fetch(url, &b) != 0) {
        free(b.data);
        return 1;
    }
    json_error_t je;
    json_t *doc = json_loadb(b.data ? b.data : "", b.len, 0, &je);
    free(b.data);
    if (!json_is_object(doc)) {
        json_decref(doc);
        fprintf(stderr, "fleetml status: %s did not answer with a status document\n", url);
        return 1;
    }
    if (as_json) {
        char *text = json_dumps(doc, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        printf("%s\n", text ? text : "{}");
        free(text);
    } else {
        print_status(doc);
    }
    json_decref(doc);
    return 0;
}

const fm_cli_cmd fm_cli_status_cmds[] = {
    {.name = "status",
     .summary = "a running node at a glance: broker, devices, pipeline, lake, certificates",
     .text = "Reads GET /status from the node's operations listener (ops.bind:ops.port\n"
             "of the data directory's settings, or --url). Certificates within 30 days of\n"
             "their end are flagged. Exit status 1 when no node answers.",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--json", NULL, "the status document as the node sends it"},
              {"--url", "URL", "the operations listener, e.g. http://10.0.0.5:9180"}},
     .examples = {"fleetml status --data /var/lib/fleetml",
                  "fleetml status --json | jq '.devices'"}},
    {.name = NULL},
};
