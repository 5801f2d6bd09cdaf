/* `fleetml template add|list|disable|enable|claim-cert`. */
#include "cli/cli.h"
#include "fleetml/measurement.h"
#include "fleetml/pki.h"
#include "fleetml/registry.h"
#include "fleetml/store.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SERIALS 100000

/* Splits text on commas/newlines/blanks in place into list (at most max). */
static size_t split_serials(char *text, const char **list, size_t max)
{
    size_t n = 0;
    for (char *p = text; *p && n < max;) {
        while (*p == ',' || *p == '\n' || *p == ' ' || *p == '\t' || *p == '\r')
            *p++ = '\0';
        if (!*p)
            break;
        list[n++] = p;
        while (*p && *p != ',' && *p != '\n' && *p != ' ' && *p != '\t' && *p != '\r')
            p++;
    }
    return n;
}

static int open_store(fm_config *cfg, fm_store **st, const char *cmd)
{
    fm_errbuf err;
    if (fm_store_open(cfg, st, &err) != 0) {
        fprintf(stderr, "fleetml template %s: %s\n", cmd, err.msg);
        return 1;
    }
    return 0;
}

static int template_add(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    fm_template t = {.cert_days = 825, .rate_per_min = 60, .status = FM_TEMPLATE_ACTIVE};
    const char *tenant = fm_cli_take_opt(&argc, argv, "--tenant");
    const char *group = fm_cli_take_opt(&argc, argv, "--group");
    const char *prefix = fm_cli_take_opt(&argc, argv, "--prefix");
    const char *days = fm_cli_take_opt(&argc, argv, "--days");
    const char *serials = fm_cli_take_opt(&argc, argv, "--serials");
    const char *serials_file = fm_cli_take_opt(&argc, argv, "--serials-file");
    const char *hook = fm_cli_take_opt(&argc, argv, "--hook");
    const char *rate = fm_cli_take_opt(&argc, argv, "--rate");
    t.allow_reprovision = fm_cli_take_flag(&argc, argv, "--reprovision");
    uint64_t v;
    if (argc != 2 || !fm_template_name_valid(argv[1])) {
        return fm_cli_usage_error("template add", "name one template ([a-z0-9-]{2,63})");
    }
    snprintf(t.name, sizeof t.name, "%s", argv[1]);
    snprintf(t.tenant, sizeof t.tenant, "%s", tenant ? tenant : "demo-hospital");
    snprintf(t.device_group, sizeof t.device_group, "%s", group ? group : "");
    const char *pfx = prefix ? prefix : t.name;
    if (strlen(pfx) >= sizeof t.device_prefix) {
        fprintf(stderr, "fleetml template add: --prefix is limited to %zu characters\n",
                sizeof t.device_prefix - 1);
        return 2;
    }
    memcpy(t.device_prefix, pfx, strlen(pfx) + 1);
    if (days) {
        if (fm_cli_parse_u64(days, 3650, &v) != 0 || v == 0) {
            fprintf(stderr, "fleetml template add: --days expects 1..3650\n");
            return 2;
        }
        t.cert_days = (int)v;
    }
    if (rate) {
        if (fm_cli_parse_u64(rate, 100000, &v) != 0) {
            fprintf(stderr, "fleetml template add: --rate expects 0..100000 (0 = unlimited)\n");
            return 2;
        }
        t.rate_per_min = (int)v;
    }
    if (hook) {
        if (strncmp(hook, "http://", 7) != 0 && strncmp(hook, "https://", 8) != 0 &&
            hook[0] != '/') {
            fprintf(stderr, "fleetml template add: --hook must be an http(s) URL or an "
                            "absolute path to an executable\n");
            return 2;
        }
        snprintf(t.hook, sizeof t.hook, "%s", hook);
    }
    fm_errbuf cerr;
    if (fm_template_check(&t, &cerr) != 0) {
        fprintf(stderr, "fleetml template add: %s\n", cerr.msg);
        return 2;
    }
    char *text = NULL;
    const char **list = NULL;
    size_t n = 0;
    if (serials || serials_file) {
        if (serials_file) {
            if (fm_read_file(serials_file, &text, NULL) != 0) {
                fprintf(stderr, "fleetml template add: cannot read %s\n", serials_file);
                return 1;
            }
        } else if (!(text = fm_strdup(serials))) {
            return 1;
        }
        list = fm_calloc(MAX_SERIALS, sizeof *list);
        if (!list) {
            fm_free(text);
            return 1;
        }
        n = split_serials(text, list, MAX_SERIALS);
        if (n == 0) {
            fprintf(stderr, "fleetml template add: the serial allow-list is empty\n");
            fm_free(text);
            fm_free(list);
            return 2;
        }
    }
    fm_store *st;
    if ((rc = open_store(&cfg, &st, "add")) == 0) {
        fm_errbuf err;
        if (fm_store_template_add(st, &t, list, n, &err) != 0) {
            fprintf(stderr, "fleetml template add: %s\n", err.msg);
            rc = 1;
        } else {
            printf("template %s added (tenant %s, prefix %s, %s)\n", t.name, t.tenant,
                   t.device_prefix, n ? "serial allow-list" : "any serial");
        }
        fm_store_close(st);
    }
    fm_free(text);
    fm_free(list);
    return rc;
}

typedef struct tlist {
    json_t *items; /* --json */
    bool quiet;    /* -q */
} tlist;

static int print_template(void *ud, const fm_template *t)
{
    tlist *l = ud;
    if (l->items)
        return json_array_append_new(l->items, fm_template_json(t));
    if (l->quiet) {
        printf("%s\n", t->name);
        return 0;
    }
    printf("%-20s %-8s tenant=%s prefix=%s days=%d rate=%d/min reprovision=%s%s%s%s\n", t->name,
           t->status == FM_TEMPLATE_ACTIVE ? "active" : "disabled", t->tenant, t->device_prefix,
           t->cert_days, t->rate_per_min, t->allow_reprovision ? "yes" : "no",
           t->has_allowlist ? " allow-list" : "", t->hook[0] ? " hook=" : "", t->hook);
    return 0;
}

static int template_list(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    tlist l = {.quiet = fm_cli_take_flag(&argc, argv, "-q")};
    bool as_json = fm_cli_take_flag(&argc, argv, "--json");
    if (argc != 1)
        return fm_cli_usage_error("template list", "unexpected argument '%s'", argv[1]);
    if (as_json && l.quiet)
        return fm_cli_usage_error("template list", "--json and -q do not go together");
    fm_store *st;
    if ((rc = open_store(&cfg, &st, "list")) != 0)
        return rc;
    l.items = as_json ? json_array() : NULL;
    rc = fm_store_template_list(st, print_template, &l) ? 1 : 0;
    fm_store_close(st);
    if (as_json)
        return rc ? (json_decref(l.items), 1) : fm_cli_print_json(json_pack("{s:o}", "items", l.items));
    return rc;
}

static int template_status(int argc, char **argv, int status)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    if (argc != 2) {
        return fm_cli_usage_error(status == FM_TEMPLATE_DISABLED ? "template disable"
                                                                 : "template enable",
                                  "name one template");
    }
    fm_store *st;
    if ((rc = open_store(&cfg, &st, argv[0])) != 0)
        return rc;
    fm_errbuf err;
    if (fm_store_template_set_status(st, argv[1], status, &err) != 0) {
        fprintf(stderr, "fleetml template %s: %s\n", argv[0], err.msg);
        rc = 1;
    } else {
        printf("template %s %sd\n", argv[1], argv[0]);
    }
    fm_store_close(st);
    return rc;
}

static int claim_cert(int argc, char **argv)
{
    fm_config cfg;
    int rc = fm_cli_config(&argc, argv, &cfg);
    if (rc)
        return rc;
    const char *out = fm_cli_take_opt(&argc, argv, "--out");
    if (argc != 2) {
        return fm_cli_usage_error("template claim-cert", "name one template");
    }
    const char *name = argv[1];
    fm_store *st;
    if ((rc = open_store(&cfg, &st, "claim-cert")) != 0)
        return rc;
    fm_errbuf err;
    char dir[PATH_MAX], rel[128], serial[64];
    if (out) {
        snprintf(dir, sizeof dir, "%s", out);
    } else {
        snprintf(rel, sizeof rel, "claims/%s", name);
        fm_config_path(&cfg, rel, dir, sizeof dir);
    }
    rc = fm_template_claim_cert(&cfg, st, name, dir, serial, sizeof serial, &err);
    fm_store_close(st);
    if (rc) {
        fprintf(stderr, "fleetml template claim-cert: %s\n", err.msg);
        return 1;
    }
    printf("claim certificate for template %s\n  certificate: %s/claim.crt\n"
           "  key:         %s/claim.key\n  serial:      %s\n  client id:   prov-<device serial>\n",
           name, dir, dir, serial);
    return 0;
}

int fm_cmd_template(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: fleetml template add|list|disable|enable|claim-cert ...\n");
        return 2;
    }
    const char *sub = argv[1];
    if (strcmp(sub, "add") == 0)
        return template_add(argc - 1, argv + 1);
    if (strcmp(sub, "list") == 0)
        return template_list(argc - 1, argv + 1);
    if (strcmp(sub, "disable") == 0)
        return template_status(argc - 1, argv + 1, FM_TEMPLATE_DISABLED);
    if (strcmp(sub, "enable") == 0)
        return template_status(argc - 1, argv + 1, FM_TEMPLATE_ACTIVE);
    if (strcmp(sub, "claim-cert") == 0)
        return claim_cert(argc - 1, argv + 1);
    fprintf(stderr, "fleetml template: unknown subcommand '%s'\n", sub);
    return 2;
}

const fm_cli_cmd fm_cli_template_cmds[] = {
    {.name = "template",
     .summary = "provisioning templates: add, list, disable, enable, claim-cert"},
    {.name = "template add",
     .args = "NAME",
     .summary = "a template devices claim their identity with",
     .text = "NAME is [a-z0-9-]{2,63}. Devices claiming with the template's claim\n"
             "certificate get an identity in its tenant and group.",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--tenant", "T", "the devices' tenant (default demo-hospital)"},
              {"--group", "G", "their device group"},
              {"--prefix", "P", "device ids are <P><serial>"},
              {"--days", "N", "certificate lifetime (default 825)"},
              {"--serials", "LIST", "only these serial numbers (a,b,c)"},
              {"--serials-file", "FILE", "only the serial numbers in FILE"},
              {"--hook", "URL", "ask this URL (or executable) to approve each claim"},
              {"--rate", "N", "claims per minute (default 60)"},
              {"--reprovision", NULL, "let a device claim again (a replaced board)"}},
     .examples = {"fleetml template add ward-a --tenant st-mary --group icu --serials-file sn.txt"}},
    {.name = "template list",
     .summary = "templates with their settings",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--json", NULL, "one JSON document: {\"items\": [template...]}"},
              {"-q", NULL, "template names only, one per line"}},
     .examples = {"fleetml template list -q"}},
    {.name = "template disable", .args = "TEMPLATE", .summary = "refuse new claims",
     .flags = FM_CLI_CONFIG,
     .examples = {"fleetml template disable ward-a"}},
    {.name = "template enable", .args = "TEMPLATE", .summary = "accept claims again",
     .flags = FM_CLI_CONFIG,
     .examples = {"fleetml template enable ward-a"}},
    {.name = "template claim-cert",
     .args = "TEMPLATE",
     .summary = "issue the template's claim certificate and key",
     .flags = FM_CLI_CONFIG,
     .opts = {{"--out", "DIR", "where claim.crt and claim.key go (default <data>/claims/<T>)"}},
     .examples = {"fleetml template claim-cert ward-a --out /media/usb"}},
    {.name = NULL},
};
