/* `fleetml device add|disable|enable|run`. */
#include "cli/cli.h"
#include "fleetml/measurement.h"
#include "fleetml/pki.h"
#include "fleetml/registry.h"
#include "fleetml/store.h"

#include <jansson.h>
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
        fprintf(stderr, "usage: fleetml device add <id> [--tenant T] [--group G] [--data DIR]\n");
        return 2;
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
        fprintf(stderr, "usage: fleetml device %s <id> [--data DIR]\n", argv[0]);
        return 2;
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
        fprintf(stderr, "usage: fleetml device revoke <id> [--data DIR]\n");
        return 2;
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

static int print_shadow(const fm_shadow *sh)
{
    json_t *des = json_loads(sh->desired, 0, NULL), *rep = json_loads(sh->reported, 0, NULL);
    char ts[40];
    json_t *doc = json_pack("{s:{s:o,s:o},s:I,s:s}", "state", "desired", des ? des : json_object(),
                            "reported", rep ? rep : json_object(), "version",
                            (json_int_t)sh->version, "updated_at",
                            sh->updated_ms ? fm_rfc3339(sh->updated_ms, ts, sizeof ts) : "");
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
        fprintf(stderr, "usage: fleetml device shadow <id> [--desired JSON] [--data DIR]\n");
        return 2;
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

int fm_cmd_device(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: fleetml device add|disable|enable|revoke|shadow|run ...\n");
        return 2;
    }
    if (strcmp(argv[1], "add") == 0)
        return device_add(argc - 1, argv + 1);
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
