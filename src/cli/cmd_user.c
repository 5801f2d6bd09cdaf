/* `fleetml user add|list|disable|enable|passwd|roles`. Passwords are never
 * taken from the command line (it shows in `ps` and shell history): they
 * come from stdin (--password-stdin) or are generated and shown once. */
#include "cli/cli.h"
#include "fleetml/auth.h"
#include "fleetml/store.h"

#include <openssl/crypto.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#define GENERATED_CHARS 20

static int open_store(fm_config *cfg, fm_store **st, const char *cmd)
{
    fm_errbuf err;
    if (fm_store_open(cfg, st, &err) != 0) {
        fprintf(stderr, "fleetml user %s: %s\n", cmd, err.msg);
        return 1;
    }
    return 0;
}

/* Reads one line (the password) from stdin into buf, without the line end.
 * A line longer than buf is reported as too long rather than cut. */
static int read_password(char *buf, size_t len, const char *cmd)
{
    if (!fgets(buf, (int)len, stdin)) {
        fprintf(stderr, "fleetml user %s: no password on stdin\n", cmd);
        return 1;
    }
    size_t n = strlen(buf);
    if (n && buf[n - 1] == '\n')
        buf[--n] = '\0';
    else if (n == len - 1) {
        fprintf(stderr, "fleetml user %s: the password is too long (at most %d bytes)\n", cmd,
                FM_PASSWORD_MAX);
        return 1;
    }
    if (n && buf[n - 1] == '\r')
        buf[--n] = '\0';
    return 0;
}

static void report(const char *cmd, int rc, const char *reason, const fm_errbuf *err)
{
    if (reason)
        fprintf(stderr, "fleetml user %s: %s\n", cmd, reason);
    else
        fprintf(stderr, "fleetml user %s: %s\n", cmd, err->msg[0] ? err->msg : fm_strerror(rc));
}

static int user_add(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    const char *tenant = fm_cli_take_opt(&argc, argv, "--tenant");
    const char *roles = fm_cli_take_opt(&argc, argv, "--roles");
    int from_stdin = fm_cli_take_flag(&argc, argv, "--password-stdin");
    int create_tenant = fm_cli_take_flag(&argc, argv, "--create-tenant");
    if (argc != 2 || !tenant || !roles) {
        return fm_cli_usage_error("user add", "name one user, with --tenant and --roles");
    }
    char pw[FM_PASSWORD_MAX + 2];
    if (from_stdin ? read_password(pw, sizeof pw, "add") != 0
                   : fm_password_generate(pw, GENERATED_CHARS) != 0)
        return 1;
    fm_store *st;
    if (open_store(&cfg, &st, "add") != 0) {
        OPENSSL_cleanse(pw, sizeof pw);
        return 1;
    }
    fm_errbuf err = {{0}};
    const char *reason = NULL;
    rc = 0;
    if (create_tenant && (rc = fm_store_tenant_ensure(st, tenant, &err)) != 0)
        report("add", rc, NULL, &err);
    if (!rc) {
        rc = fm_auth_user_create(st, tenant, argv[1], pw, roles, &reason, &err);
        if (rc == FM_ENOTFOUND)
            fprintf(stderr, "fleetml user add: tenant '%s' does not exist (add --create-tenant to"
                            " create it)\n", tenant);
        else if (rc)
            report("add", rc, reason, &err);
    }
    if (!rc) {
        fm_user u;
        char uname[65];
        fm_username_normalize(argv[1], uname, sizeof uname);
        if (fm_store_user_get(st, tenant, uname, &u) == 0)
            printf("user %s added to tenant %s (roles %s)\n", u.username, u.tenant, u.roles);
        if (!from_stdin)
            printf("password: %s\n(shown once; it is stored only as an argon2id hash)\n", pw);
    }
    OPENSSL_cleanse(pw, sizeof pw);
    fm_store_close(st);
    return rc ? 1 : 0;
}

typedef struct ulist {
    fm_store *st;
    json_t *items; /* --json */
} ulist;

static int print_user(void *ud, const fm_user *u)
{
    ulist *l = ud;
    if (l->items)
        return json_array_append_new(l->items, fm_user_json(l->st, u));
    char when[32];
    printf("%-20s %-24s %-9s %-8lld %-25s %s\n", u->tenant, u->username,
           u->status == FM_USER_ACTIVE ? "active" : "disabled", (long long)u->epoch,
           fm_rfc3339(u->created_ms, when, sizeof when), u->roles);
    return 0;
}

static int user_list(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    const char *tenant = fm_cli_take_opt(&argc, argv, "--tenant");
    bool as_json = fm_cli_take_flag(&argc, argv, "--json");
    if (argc != 1)
        return fm_cli_usage_error("user list", "unexpected argument '%s'", argv[1]);
    fm_store *st;
    if (open_store(&cfg, &st, "list") != 0)
        return 1;
    ulist l = {.st = st, .items = as_json ? json_array() : NULL};
    if (!as_json)
        printf("%-20s %-24s %-9s %-8s %-25s %s\n", "TENANT", "USERNAME", "STATUS", "EPOCH",
               "CREATED", "ROLES");
    rc = fm_store_user_list(st, tenant, print_user, &l);
    fm_store_close(st);
    if (rc) {
        json_decref(l.items);
        fprintf(stderr, "fleetml user list: %s\n", fm_strerror(rc));
        return 1;
    }
    return as_json ? fm_cli_print_json(json_pack("{s:o}", "items", l.items)) : 0;
}

static int user_status(int argc, char **argv, int status, const char *cmd)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    const char *tenant = fm_cli_take_opt(&argc, argv, "--tenant");
    if (argc != 2 || !tenant) {
        char name[32];
        snprintf(name, sizeof name, "user %s", cmd);
        return fm_cli_usage_error(name, "name one user, with --tenant");
    }
    fm_store *st;
    if (open_store(&cfg, &st, cmd) != 0)
        return 1;
    fm_errbuf err = {{0}};
    rc = fm_auth_user_set_status(st, tenant, argv[1], status, &err);
    fm_store_close(st);
    if (rc) {
        report(cmd, rc, NULL, &err);
        return 1;
    }
    printf("user %s in tenant %s %s%s\n", argv[1], tenant,
           status == FM_USER_ACTIVE ? "enabled" : "disabled",
           status == FM_USER_ACTIVE ? "" : "; its sessions and tokens are revoked");
    return 0;
}

static int user_passwd(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    const char *tenant = fm_cli_take_opt(&argc, argv, "--tenant");
    int from_stdin = fm_cli_take_flag(&argc, argv, "--password-stdin");
    if (argc != 2 || !tenant || !from_stdin) {
        return fm_cli_usage_error("user passwd",
                                  "name one user, with --tenant and --password-stdin");
    }
    char pw[FM_PASSWORD_MAX + 2];
    if (read_password(pw, sizeof pw, "passwd") != 0)
        return 1;
    fm_store *st;
    if (open_store(&cfg, &st, "passwd") != 0) {
        OPENSSL_cleanse(pw, sizeof pw);
        return 1;
    }
    fm_errbuf err = {{0}};
    const char *reason = NULL;
    rc = fm_auth_set_password(st, tenant, argv[1], pw, &reason, &err);
    OPENSSL_cleanse(pw, sizeof pw);
    fm_store_close(st);
    if (rc) {
        report("passwd", rc, reason, &err);
        return 1;
    }
    printf("password of %s in tenant %s changed; its sessions and tokens are revoked\n", argv[1],
           tenant);
    return 0;
}

static int user_roles(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    const char *tenant = fm_cli_take_opt(&argc, argv, "--tenant");
    const char *roles = fm_cli_take_opt(&argc, argv, "--roles");
    if (argc != 2 || !tenant || !roles) {
        return fm_cli_usage_error("user roles", "name one user, with --tenant and --roles");
    }
    fm_store *st;
    if (open_store(&cfg, &st, "roles") != 0)
        return 1;
    fm_errbuf err = {{0}};
    rc = fm_auth_user_set_roles(st, tenant, argv[1], roles, &err);
    fm_store_close(st);
    if (rc) {
        report("roles", rc, NULL, &err);
        return 1;
    }
    printf("roles of %s in tenant %s set to %s\n", argv[1], tenant, roles);
    return 0;
}

int fm_cmd_user(int argc, char **argv)
{
    if (argc >= 2) {
        const char *sub = argv[1];
        if (strcmp(sub, "add") == 0)
            return user_add(argc - 1, argv + 1);
        if (strcmp(sub, "list") == 0)
            return user_list(argc - 1, argv + 1);
        if (strcmp(sub, "disable") == 0)
            return user_status(argc - 1, argv + 1, FM_USER_DISABLED, "disable");
        if (strcmp(sub, "enable") == 0)
            return user_status(argc - 1, argv + 1, FM_USER_ACTIVE, "enable");
        if (strcmp(sub, "passwd") == 0)
            return user_passwd(argc - 1, argv + 1);
        if (strcmp(sub, "roles") == 0)
            return user_roles(argc - 1, argv + 1);
    }
    fprintf(stderr, "usage: fleetml user add|list|disable|enable|passwd|roles ...\n"
                    "  fleetml user add <username> --tenant T --roles r1,r2 [--password-stdin]\n"
                    "  fleetml user list [--tenant T]\n"
                    "  fleetml user disable|enable <username> --tenant T\n"
                    "  fleetml user passwd <username> --tenant T --password-stdin\n"
                    "  fleetml user roles <username> --tenant T --roles r1,r2\n");
    return 2;
}

const fm_cli_cmd fm_cli_user_cmds[] = {
    {.name = "user", .summary = "users: add, list, disable, enable, passwd, roles"},
    {.name = "user add",
     .args = "USERNAME",
     .summary = "a user of a tenant, with roles",
     .text = "Roles: admin, clinician, data_scientist, device_manager, operator. Without\n"
             "--password-stdin a password is generated and printed once.",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--tenant", "T", "the user's tenant"},
              {"--roles", "R1,R2", "roles, comma-separated"},
              {"--password-stdin", NULL, "read the password from stdin"},
              {"--create-tenant", NULL, "create the tenant when it does not exist"}},
     .examples = {"fleetml user add alice --tenant st-mary --roles clinician"}},
    {.name = "user list",
     .summary = "users with status and roles",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--tenant", "T", "only this tenant's users"},
              {"--json", NULL, "one JSON document: {\"items\": [user...]}"}},
     .examples = {"fleetml user list --tenant st-mary --json"}},
    {.name = "user disable", .args = "USERNAME", .summary = "refuse the user's sign-in",
     .flags = FM_CLI_CONFIG, .opts = {{"--tenant", "T", "the user's tenant"}},
     .examples = {"fleetml user disable alice --tenant st-mary"}},
    {.name = "user enable", .args = "USERNAME", .summary = "let the user sign in again",
     .flags = FM_CLI_CONFIG, .opts = {{"--tenant", "T", "the user's tenant"}},
     .examples = {"fleetml user enable alice --tenant st-mary"}},
    {.name = "user passwd",
     .args = "USERNAME",
     .summary = "set the user's password (from stdin)",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--tenant", "T", "the user's tenant"},
              {"--password-stdin", NULL, "read the password from stdin (required)"}},
     .examples = {"printf '%s' \"$PW\" | fleetml user passwd alice --tenant st-mary --password-stdin"}},
    {.name = "user roles",
     .args = "USERNAME",
     .summary = "replace the user's roles",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--tenant", "T", "the user's tenant"}, {"--roles", "R1,R2", "the new roles"}},
     .examples = {"fleetml user roles alice --tenant st-mary --roles clinician,operator"}},
    {.name = NULL},
};
