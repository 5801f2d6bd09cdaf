/*
 * `fleetml init`: creates the data directory. Every step checks what is
 * already there first, so running it again changes nothing.
 */
#include "cli/cli.h"
#include "fleetml/auth.h"
#include "fleetml/pki.h"
#include "fleetml/store.h"

#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define DEMO_TENANT "demo-hospital"
#define CA_DAYS 3650
#define LEAF_DAYS 825

static int exists(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0;
}

/* Issues a leaf certificate unless both files are already there. */
static int ensure_leaf(const fm_config *cfg, fm_ca **ca, const char *ca_key, const char *ca_crt,
                       const char *name, const fm_cert_req *req)
{
    char key[PATH_MAX], crt[PATH_MAX], rel[64];
    fm_errbuf err;
    snprintf(rel, sizeof rel, "pki/%s.key", name);
    fm_config_path(cfg, rel, key, sizeof key);
    snprintf(rel, sizeof rel, "pki/%s.crt", name);
    fm_config_path(cfg, rel, crt, sizeof crt);
    if (exists(key) && exists(crt))
        return 0;
    if (!*ca && fm_ca_load(ca_key, ca_crt, ca, &err) != 0) {
        fprintf(stderr, "fleetml init: %s\n", err.msg);
        return 1;
    }
    if (fm_ca_issue_keypair(*ca, req, key, crt, NULL, &err) != 0) {
        fprintf(stderr, "fleetml init: %s certificate: %s\n", name, err.msg);
        return 1;
    }
    printf("issued %s certificate: %s\n", name, crt);
    return 0;
}

int fm_cmd_init(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    if (argc > 1) {
        return fm_cli_usage_error("init", "unexpected argument '%s'", argv[1]);
    }
    char path[PATH_MAX], ca_key[PATH_MAX], ca_crt[PATH_MAX];
    fm_errbuf err;
    /* The data directory is traversable (not listable) by others so the
     * broker can run as its own unprivileged user and reach broker/; what
     * is secret lives in 0700 subdirectories. */
    if (fm_mkdirs(cfg.data_dir, 0711) != 0 ||
        fm_mkdirs(fm_config_path(&cfg, "pki", path, sizeof path), 0700) != 0 ||
        fm_mkdirs(cfg.lake_dir, 0750) != 0) {
        fprintf(stderr, "fleetml init: cannot create directories under %s\n", cfg.data_dir);
        return 1;
    }

    fm_config_path(&cfg, "fleetml.conf", path, sizeof path);
    if (!exists(path)) {
        char *text;
        if (fm_config_render(&cfg, &text) != 0 ||
            fm_write_file_atomic(path, text, strlen(text), 0640) != 0) {
            fprintf(stderr, "fleetml init: cannot write %s\n", path);
            return 1;
        }
        fm_free(text);
        printf("wrote %s\n", path);
    }

    fm_config_path(&cfg, "pki/ca.key", ca_key, sizeof ca_key);
    fm_config_path(&cfg, "pki/ca.crt", ca_crt, sizeof ca_crt);
    if (!exists(ca_key) && !exists(ca_crt)) {
        if (fm_ca_create(ca_key, ca_crt, "fleetml root CA", CA_DAYS, &err) != 0) {
            fprintf(stderr, "fleetml init: CA: %s\n", err.msg);
            return 1;
        }
        printf("created CA: %s\n", ca_crt);
    } else if (!exists(ca_key) || !exists(ca_crt)) {
        fprintf(stderr, "fleetml init: only one of %s and %s exists; refusing to guess\n",
                ca_key, ca_crt);
        return 1;
    }

    char host[256] = "localhost";
    if (gethostname(host, sizeof host - 1) != 0)
        snprintf(host, sizeof host, "localhost");
    const char *dns[] = {"localhost", host, NULL};
    const char *ips[] = {"127.0.0.1", "::1", NULL};
    fm_cert_req broker = {.common_name = "fleetml-broker", .dns_sans = dns, .ip_sans = ips,
                          .usage = FM_CERT_SERVER, .days = LEAF_DAYS};
    fm_cert_req service = {.common_name = "fleetml-service", .usage = FM_CERT_CLIENT,
                           .days = LEAF_DAYS};
    fm_ca *ca = NULL;
    rc = ensure_leaf(&cfg, &ca, ca_key, ca_crt, "broker", &broker);
    if (!rc)
        rc = ensure_leaf(&cfg, &ca, ca_key, ca_crt, "service", &service);
    fm_ca_free(ca);
    if (rc)
        return rc;

    /* The key that signs users' access tokens (ES256). Kept apart from the
     * CA key: rotating one must not touch the other. */
    fm_config_path(&cfg, "pki/jwt.key", path, sizeof path);
    if (!exists(path)) {
        if (fm_jwt_key_create(path, &err) != 0) {
            fprintf(stderr, "fleetml init: token-signing key: %s\n", err.msg);
            return 1;
        }
        printf("created token-signing key: %s\n", path);
    }

    fm_store *st;
    if (fm_store_open(&cfg, &st, &err) != 0) {
        fprintf(stderr, "fleetml init: store: %s\n", err.msg);
        return 1;
    }
    long users = 0;
    rc = fm_store_tenant_ensure(st, DEMO_TENANT, &err);
    if (!rc)
        rc = fm_store_user_count(st, DEMO_TENANT, &users);
    if (!rc && users == 0) {
        char pw[24], hash[FM_PASSWORD_HASH_MAX];
        rc = fm_password_generate(pw, 20);
        if (!rc)
            rc = fm_password_hash(pw, hash, sizeof hash);
        if (!rc)
            rc = fm_store_user_create(st, DEMO_TENANT, "admin", hash, "admin", &err);
        if (!rc) {
            printf("created tenant '%s' with user 'admin'\n", DEMO_TENANT);
            printf("admin password: %s\n", pw);
            printf("(shown once; it is stored only as an argon2id hash)\n");
        }
        memset(pw, 0, sizeof pw);
    }
    fm_store_close(st);
    if (rc) {
        fprintf(stderr, "fleetml init: %s\n", err.msg[0] ? err.msg : fm_strerror(rc));
        return 1;
    }
    printf("data directory ready: %s\n", cfg.data_dir);
    return 0;
}

const fm_cli_cmd fm_cli_init_cmds[] = {
    {.name = "init",
     .summary = "create the data directory: CA, certificates, database, lake, admin",
     .text = "Creates what `fleetml serve` needs in the data directory: the certificate\n"
             "authority and the broker's and service's certificates, the database (SQLite,\n"
             "or the PostgreSQL schema when store.url says so), the lake, the default\n"
             "tenant and its first admin (password printed once). Running it again\n"
             "changes nothing that exists.",
     .flags = FM_CLI_CONFIG,
     .examples = {"fleetml init --data /var/lib/fleetml",
                  "fleetml init --data ./var --set store.url=postgres://fleetml@db/fleetml"}},
    {.name = NULL},
};
