/* `fleetml device add|list|show|disable|enable|revoke|shadow|run`. */
#include "cli/cli.h"
#include "fleetml/json.h"
#include "fleetml/measurement.h"
#include "fleetml/pki.h"
#include "fleetml/registry.h"
#include "fleetml/store.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define DEVICE_CERT_DAYS 825

/* The not-after of the certificate just written at path, kept with the
 * device so the fleet view shows when it ends. */
static int cert_not_after(const char *path, int64_t *not_after_ms, fm_errbuf *err)
{
    char *pem = NULL;
    size_t len = 0;
    char serial[64];
    int rc = fm_read_file(path, &pem, &len);
    if (rc)
        return fm_errf(err, rc, "cannot read %s", path);
    rc = fm_cert_pem_info(pem, len, serial, sizeof serial, NULL, 0, not_after_ms);
    fm_free(pem);
    return rc ? fm_errf(err, rc, "cannot read the certificate %s", path) : 0;
}

static int device_add(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    const char *tenant = fm_cli_take_opt(&argc, argv, "--tenant");
    const char *group = fm_cli_take_opt(&argc, argv, "--group");
    if (!tenant)
        tenant = "demo-hospital";
    if (argc != 2 || (group && (strlen(group) > 64 || strpbrk(group, " \t\r\n\"\\")))) {
        return fm_cli_usage_error("device add", argc != 2 ? "name one device id"
                                                          : "--group: at most 64 characters, no "
                                                            "blanks, quotes or backslashes");
    }
    const char *id = argv[1];
    if (!fm_device_id_valid(id)) {
        fprintf(stderr, "fleetml device add: '%s' is not a valid device id "
                        "([a-z0-9][a-z0-9-]{2,63})\n", id);
        return 2;
    }
    /* The service's certificate CN has broker-wide rights; a device must
     * never be issued a certificate with that name (or anything like it). */
    if (strncmp(id, "fleetml-", 8) == 0 || strcmp(id, "provisioning") == 0) {
        fprintf(stderr, "fleetml device add: 'provisioning' and ids starting with 'fleetml-' "
                        "are reserved\n");
        return 2;
    }
    fm_errbuf err;
    fm_store *st;
    if (fm_store_open(&cfg, &st, &err) != 0) {
        fprintf(stderr, "fleetml device add: %s\n", err.msg);
        return 1;
    }
    fm_device existing;
    if (fm_store_device_get(st, id, &existing) == 0) {
        fprintf(stderr, "fleetml device add: device '%s' already exists\n", id);
        fm_store_close(st);
        return 1;
    }
    char dir[PATH_MAX], rel[128], key[PATH_MAX], crt[PATH_MAX], ca_key[PATH_MAX],
        ca_crt[PATH_MAX];
    snprintf(rel, sizeof rel, "devices/%s", id);
    fm_config_path(&cfg, rel, dir, sizeof dir);
    snprintf(rel, sizeof rel, "devices/%s/device.key", id);
    fm_config_path(&cfg, rel, key, sizeof key);
    snprintf(rel, sizeof rel, "devices/%s/device.crt", id);
    fm_config_path(&cfg, rel, crt, sizeof crt);
    fm_config_path(&cfg, "pki/ca.key", ca_key, sizeof ca_key);
    fm_config_path(&cfg, "pki/ca.crt", ca_crt, sizeof ca_crt);
    fm_ca *ca = NULL;
    fm_device d = {0};
    snprintf(d.id, sizeof d.id, "%s", id);
    snprintf(d.tenant, sizeof d.tenant, "%s", tenant);
    snprintf(d.device_group, sizeof d.device_group, "%s", group ? group : "");
    d.status = FM_DEVICE_ACTIVE;
    fm_cert_req req = {.common_name = id, .usage = FM_CERT_CLIENT, .days = DEVICE_CERT_DAYS};
    rc = fm_mkdirs(dir, 0700) ? fm_errf(&err, FM_EIO, "cannot create %s", dir) : 0;
    if (!rc)
        rc = fm_ca_load(ca_key, ca_crt, &ca, &err);
    if (!rc)
        rc = fm_ca_issue_keypair(ca, &req, key, crt, d.cert_serial, &err);
    if (!rc)
        rc = cert_not_after(crt, &d.cert_not_after_ms, &err);
    /* Register only once the certificate exists; if registering fails the
     * certificate is removed so no usable identity is left behind. */
    if (!rc && (rc = fm_store_device_add(st, &d, &err)) != 0) {
        unlink(key);
        unlink(crt);
        rmdir(dir);
    }
    fm_ca_free(ca);
    fm_store_close(st);
    if (rc) {
        fprintf(stderr, "fleetml device add: %s\n", err.msg);
        return 1;
    }
    printf("device %s added to tenant %s\n  certificate: %s\n  key:         %s\n", id, tenant,
           crt, key);
    return 0;
}

static int device_status(int argc, char **argv, int status)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    if (argc != 2) {
        return fm_cli_usage_error(status == FM_DEVICE_DISABLED ? "device disable" : "device enable",
                                  "name one device");
    }
    fm_errbuf err;
    fm_store *st;
    if (fm_store_open(&cfg, &st, &err) != 0 ||
        fm_store_device_set_status(st, argv[1], status, &err) != 0) {
        fprintf(stderr, "fleetml device %s: %s\n", argv[0], err.msg);
        fm_store_close(st);
        return 1;
    }
    fm_store_close(st);
    printf("device %s %sd\n", argv[1], argv[0]);
    return 0;
}

static int device_revoke(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    if (argc != 2) {
        return fm_cli_usage_error("device revoke", "name one device");
    }
    fm_errbuf err;
    fm_store *st = NULL;
    if (fm_store_open(&cfg, &st, &err) != 0 || fm_store_device_revoke(st, argv[1], &err) != 0) {
        fprintf(stderr, "fleetml device revoke: %s\n", err.msg);
        fm_store_close(st);
        return 1;
    }
    fm_store_close(st);
    /* The running platform follows the registry event log: it cuts the
     * device's sessions and updates the CRL within about a second. */
    printf("device %s revoked (irreversible)\n", argv[1]);
    return 0;
}

/* {"state": {"desired", "reported"}, "version", "updated_at"}: new reference. */
static json_t *shadow_json(const fm_shadow *sh)
{
    json_t *des = json_loads(sh->desired, 0, NULL), *rep = json_loads(sh->reported, 0, NULL);
    char ts[40];
    return json_pack("{s:{s:o,s:o},s:I,s:s}", "state", "desired", des ? des : json_object(),
                     "reported", rep ? rep : json_object(), "version", (json_int_t)sh->version,
                     "updated_at", sh->updated_ms ? fm_rfc3339(sh->updated_ms, ts, sizeof ts) : "");
}

static int print_shadow(const fm_shadow *sh)
{
    json_t *doc = shadow_json(sh);
    char *text = doc ? json_dumps(doc, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;
    json_decref(doc);
    if (!text)
        return 1;
    printf("%s\n", text);
    fm_free(text);
    return 0;
}

static int device_shadow(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    const char *desired = fm_cli_take_opt(&argc, argv, "--desired");
    if (argc != 2) {
        return fm_cli_usage_error("device shadow", "name one device");
    }
    json_t *patch = NULL;
    if (desired) {
        json_error_t je;
        patch = json_loads(desired, JSON_REJECT_DUPLICATES, &je);
        if (!json_is_object(patch)) {
            fprintf(stderr, "fleetml device shadow: --desired must be a JSON object (%s)\n",
                    je.text);
            json_decref(patch);
            return 2;
        }
    }
    fm_errbuf err;
    fm_store *st = NULL;
    fm_device d;
    if (fm_store_open(&cfg, &st, &err) != 0) {
        fprintf(stderr, "fleetml device shadow: %s\n", err.msg);
        json_decref(patch);
        return 1;
    }
    if (fm_store_device_get(st, argv[1], &d) != 0) {
        fprintf(stderr, "fleetml device shadow: device '%s' does not exist\n", argv[1]);
        rc = 1;
    }
    fm_shadow sh = {0};
    if (!rc) {
        int src = patch ? fm_shadow_set_desired(st, argv[1], patch, &sh, &err)
                        : fm_store_shadow_get(st, argv[1], &sh);
        if (src) {
            fprintf(stderr, "fleetml device shadow: %s\n",
                    patch ? err.msg : "cannot read the shadow");
            rc = 1;
        }
    }
    if (!rc)
        rc = print_shadow(&sh);
    fm_shadow_clear(&sh);
    json_decref(patch);
    fm_store_close(st);
    return rc;
}

typedef struct list_ctx {
    fm_store *st;
    json_t *items; /* NULL with -q: ids are printed as they come */
    char last[72]; /* the last id seen: the next page starts after it */
    size_t n;
} list_ctx;

static int on_listed(void *ud, const fm_device *d)
{
    list_ctx *c = ud;
    c->n++;
    snprintf(c->last, sizeof c->last, "%s", d->id);
    if (!c->items) {
        printf("%s\n", d->id);
        return 0;
    }
    json_t *j = fm_device_json(c->st, d);
    return j ? json_array_append_new(c->items, j) : 1;
}

/* The text view of a device; the JSON one (fm_device_json) has the same
 * fields. */
static void print_device_row(json_t *d)
{
    const char *group = json_string_value(json_object_get(d, "group"));
    const char *exp = json_string_value(json_object_get(d, "cert_expires_at"));
    const char *seen = json_string_value(json_object_get(d, "last_seen"));
    printf("%-24s %-18s %-8s %-8s %-12s %-24s %s\n",
           json_string_value(json_object_get(d, "id")),
           json_string_value(json_object_get(d, "tenant")),
           json_string_value(json_object_get(d, "status")),
           json_is_true(json_object_get(d, "online")) ? "online" : "offline",
           group && *group ? group : "-", seen ? seen : "-", exp ? exp : "-");
}

static int device_list(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    const char *tenant = fm_cli_take_opt(&argc, argv, "--tenant");
    bool as_json = fm_cli_take_flag(&argc, argv, "--json");
    bool quiet = fm_cli_take_flag(&argc, argv, "-q");
    if (argc != 1)
        return fm_cli_usage_error("device list", "unexpected argument '%s'", argv[1]);
    if (as_json && quiet)
        return fm_cli_usage_error("device list", "--json and -q do not go together");
    fm_errbuf err;
    fm_store *st;
    if (fm_store_open(&cfg, &st, &err) != 0) {
        fprintf(stderr, "fleetml device list: %s\n", err.msg);
        return 1;
    }
    list_ctx c = {.st = st, .items = quiet ? NULL : json_array()};
    /* Pages of 500 by id, so a large fleet is never one result. */
    for (;;) {
        size_t before = c.n;
        rc = fm_store_device_page(st, tenant, c.last, 500, on_listed, &c);
        if (rc || c.n - before < 500)
            break;
    }
    fm_store_close(st);
    if (rc) {
        json_decref(c.items);
        fprintf(stderr, "fleetml device list: cannot read the devices\n");
        return 1;
    }
    if (as_json)
        return fm_cli_print_json(json_pack("{s:o}", "items", c.items));
    if (!quiet) {
        printf("%-24s %-18s %-8s %-8s %-12s %-24s %s\n", "ID", "TENANT", "STATUS", "PRESENCE",
               "GROUP", "LAST SEEN", "CERT ENDS");
        for (size_t i = 0; i < json_array_size(c.items); i++)
            print_device_row(json_array_get(c.items, i));
        json_decref(c.items);
    }
    return 0;
}

typedef struct cert_list {
    json_t *items;
} cert_list;

static int on_cert(void *ud, const char *serial, int status, int64_t when)
{
    static const char *const names[] = {"active", "grace", "revoked"};
    json_array_append_new(((cert_list *)ud)->items,
                          json_pack("{s:s,s:s,s:o}", "serial", serial, "status",
                                    status >= 0 && status <= 2 ? names[status] : "unknown",
                                    "until", fm_json_time(when)));
    return 0;
}

static int device_show(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    bool as_json = fm_cli_take_flag(&argc, argv, "--json");
    if (argc != 2)
        return fm_cli_usage_error("device show", "name one device");
    fm_errbuf err;
    fm_store *st;
    if (fm_store_open(&cfg, &st, &err) != 0) {
        fprintf(stderr, "fleetml device show: %s\n", err.msg);
        return 1;
    }
    fm_device d;
    if (fm_store_device_get(st, argv[1], &d) != 0) {
        fm_store_close(st);
        fprintf(stderr, "fleetml device show: device '%s' does not exist\n", argv[1]);
        return 1;
    }
    json_t *doc = fm_device_json(st, &d);
    cert_list cl = {.items = json_array()};
    fm_store_device_certs(st, d.id, on_cert, &cl);
    fm_shadow sh = {0};
    json_t *shadow = fm_store_shadow_get(st, d.id, &sh) == 0 && sh.version ? shadow_json(&sh)
                                                                              : NULL;
    fm_shadow_clear(&sh);
    fm_store_close(st);
    if (!doc) {
        json_decref(cl.items);
        json_decref(shadow);
        return 1;
    }
    json_object_set_new(doc, "certificates", cl.items);
    json_object_set_new(doc, "shadow", shadow ? shadow : json_null());
    if (as_json)
        return fm_cli_print_json(doc);
    const char *k;
    json_t *v;
    json_object_foreach(doc, k, v) {
        if (strcmp(k, "shadow") == 0)
            continue;
        if (json_is_string(v))
            printf("%-16s %s\n", k, json_string_value(v)[0] ? json_string_value(v) : "-");
        else if (json_is_boolean(v))
            printf("%-16s %s\n", k, json_is_true(v) ? "yes" : "no");
        else if (json_is_null(v))
            printf("%-16s -\n", k);
    }
    for (size_t i = 0; i < json_array_size(cl.items); i++) {
        json_t *c = json_array_get(cl.items, i);
        printf("certificate      %s %s\n", json_string_value(json_object_get(c, "serial")),
               json_string_value(json_object_get(c, "status")));
    }
    char *sh_text = shadow ? json_dumps(json_object_get(shadow, "state"), JSON_COMPACT) : NULL;
    printf("shadow           %s\n", sh_text ? sh_text : "-");
    fm_free(sh_text);
    json_decref(doc);
    return 0;
}

int fm_cmd_device(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: fleetml device add|disable|enable|revoke|shadow|run ...\n");
        return 2;
    }
    if (strcmp(argv[1], "add") == 0)
        return device_add(argc - 1, argv + 1);
    if (strcmp(argv[1], "list") == 0)
        return device_list(argc - 1, argv + 1);
    if (strcmp(argv[1], "show") == 0)
        return device_show(argc - 1, argv + 1);
    if (strcmp(argv[1], "disable") == 0)
        return device_status(argc - 1, argv + 1, FM_DEVICE_DISABLED);
    if (strcmp(argv[1], "enable") == 0)
        return device_status(argc - 1, argv + 1, FM_DEVICE_ACTIVE);
    if (strcmp(argv[1], "revoke") == 0)
        return device_revoke(argc - 1, argv + 1);
    if (strcmp(argv[1], "shadow") == 0)
        return device_shadow(argc - 1, argv + 1);
    if (strcmp(argv[1], "run") == 0)
        return fm_cmd_device_run(argc - 1, argv + 1);
    fprintf(stderr, "fleetml device: unknown subcommand '%s'\n", argv[1]);
    return 2;
}

const fm_cli_cmd fm_cli_device_cmds[] = {
    {.name = "device", .summary = "devices: add, list, show, disable, enable, revoke, shadow, run"},
    {.name = "device add",
     .args = "ID",
     .summary = "register a device and issue its certificate",
     .text = "ID is [a-z0-9][a-z0-9-]{2,63}. The certificate and key go to\n"
             "<data>/devices/<ID>/ (devices onboarded by claim get theirs over MQTT).",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--tenant", "T", "the device's tenant (default demo-hospital)"},
              {"--group", "G", "its device group (processor functions, deployments)"}},
     .examples = {"fleetml device add icu-visco-07 --tenant st-mary --group icu"}},
    {.name = "device list",
     .summary = "devices with status, group, presence and certificate end",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--tenant", "T", "only this tenant's devices"},
              {"--json", NULL, "one JSON document: {\"items\": [device...]}"},
              {"-q", NULL, "device ids only, one per line"}},
     .examples = {"fleetml device list --tenant st-mary",
                  "fleetml device list --json | jq -r '.items[] | select(.online) | .id'"}},
    {.name = "device show",
     .args = "DEVICE",
     .summary = "one device: status, certificates, presence, shadow",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--json", NULL, "one JSON document"}},
     .examples = {"fleetml device show icu-visco-07 --json"}},
    {.name = "device disable",
     .args = "DEVICE",
     .summary = "refuse the device's connections until enabled again",
     .flags = FM_CLI_CONFIG,
     .examples = {"fleetml device disable icu-visco-07 --data /var/lib/fleetml"}},
    {.name = "device enable", .args = "DEVICE", .summary = "let a disabled device connect again",
     .flags = FM_CLI_CONFIG,
     .examples = {"fleetml device enable icu-visco-07"}},
    {.name = "device revoke",
     .args = "DEVICE",
     .summary = "revoke the device's certificates for good (CRL, broker)",
     .flags = FM_CLI_CONFIG,
     .examples = {"fleetml device revoke icu-visco-07"}},
    {.name = "device shadow",
     .args = "DEVICE",
     .summary = "show the device's shadow, or set its desired state",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--desired", "JSON", "merge this object into the desired state"}},
     .examples = {"fleetml device shadow icu-visco-07 --desired '{\"interval_s\": 60}'"}},
    {.name = "device run",
     .args = "[DEVICE]",
     .summary = "run one simulated device (the device SDK) until stopped",
     .text = "Either a registered DEVICE (state in <data>/devices/<DEVICE>), or a new one\n"
             "onboarded by claim with --claim and --serial (state in <data>/sim/<S>).",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--claim", "TEMPLATE", "onboard through this template's claim certificate"},
              {"--serial", "S", "the serial number to claim with"},
              {"--state", "DIR", "the device's state directory"},
              {"--count", "N", "measurements to send (0 = forever)"},
              {"--interval", "SECONDS", "between measurements (default 5)"},
              {"--seed", "S", "the simulated sweeps' seed"},
              {"--timeout", "SECONDS", "result wait per attempt (default 10)"},
              {"--outbox-max", "N", "measurements kept while offline"},
              {"--drop-oldest", NULL, "when the outbox is full, drop the oldest"}},
     .examples = {"fleetml device run icu-visco-07 --count 10 --interval 1",
                  "fleetml device run --claim ward-a --serial SN-0042"}},
    {.name = NULL},
};
