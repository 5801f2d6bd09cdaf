/*
 * The front of `fleetml`: finds the command in the tables (cli.h), answers
 * help in every form (`fleetml help ...`, `--help`, the man page, bash
 * completion, the tables as JSON for the tests), refuses options a table
 * does not list, then runs the command's code.
 */
#include "cli/cli.h"
#include "fleetml/core.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct group {
    const char *name;
    int (*run)(int argc, char **argv); /* called with argv[0] = the group's word */
    const fm_cli_cmd *cmds;            /* [0] is the group itself */
} group;

static const group groups[] = {
    {"init", fm_cmd_init, fm_cli_init_cmds},
    {"serve", fm_cmd_serve, fm_cli_serve_cmds},
    {"status", fm_cmd_status, fm_cli_status_cmds},
    {"device", fm_cmd_device, fm_cli_device_cmds},
    {"template", fm_cmd_template, fm_cli_template_cmds},
    {"user", fm_cmd_user, fm_cli_user_cmds},
    {"sim", fm_cmd_sim, fm_cli_sim_cmds},
    {"features", fm_cmd_features, fm_cli_features_cmds},
    {"model", fm_cmd_model, fm_cli_model_cmds},
    {"lake", fm_cmd_lake, fm_cli_lake_cmds},
    {"rules", fm_cmd_rules, fm_cli_rules_cmds},
    {"function", fm_cmd_function, fm_cli_function_cmds},
    {"api", fm_cmd_api, fm_cli_api_cmds},
    {"bench", fm_cmd_bench, fm_cli_bench_cmds},
};
#define NGROUPS (sizeof groups / sizeof groups[0])

/* The options every command taking FM_CLI_CONFIG accepts, and help. */
static const fm_cli_opt config_opts[] = {
    {"--data", "DIR", "the data directory (default ./var)"},
    {"--set", "KEY=VALUE", "override a setting, e.g. --set node.log_level=debug (repeatable)"},
};
static const fm_cli_opt help_opt = {"--help", NULL, "show this help and exit (also -h)"};

/* Set while a command runs (common.c checks fm_cli_take_* against them). */
extern const fm_cli_cmd *fm_cli__running, *fm_cli__running_group;

static const group *find_group(const char *name)
{
    for (size_t i = 0; name && i < NGROUPS; i++)
        if (strcmp(groups[i].name, name) == 0)
            return &groups[i];
    return NULL;
}

static bool has_subs(const group *g) { return g->cmds[1].name != NULL; }

/* The entry "<group> <sub>", or NULL. */
static const fm_cli_cmd *find_sub(const group *g, const char *sub)
{
    size_t gl = strlen(g->name);
    for (const fm_cli_cmd *c = g->cmds + 1; sub && c->name; c++)
        if (strncmp(c->name, g->name, gl) == 0 && c->name[gl] == ' ' &&
            strcmp(c->name + gl + 1, sub) == 0)
            return c;
    return NULL;
}

static const char *last_word(const char *name)
{
    const char *sp = strrchr(name, ' ');
    return sp ? sp + 1 : name;
}

/* The option `name` of c (config options included), or NULL. */
static const fm_cli_opt *find_opt(const fm_cli_cmd *c, const char *name)
{
    for (size_t i = 0; i < FM_CLI_OPTS_MAX && c->opts[i].name; i++)
        if (strcmp(c->opts[i].name, name) == 0)
            return &c->opts[i];
    if (c->flags & FM_CLI_CONFIG)
        for (size_t i = 0; i < sizeof config_opts / sizeof config_opts[0]; i++)
            if (strcmp(config_opts[i].name, name) == 0)
                return &config_opts[i];
    return NULL;
}

/* ---- help text ----------------------------------------------------------------- */

static void opt_line(FILE *f, const fm_cli_opt *o)
{
    char left[64];
    snprintf(left, sizeof left, "%s%s%s", o->name, o->arg ? " " : "", o->arg ? o->arg : "");
    if (strlen(left) <= 22)
        fprintf(f, "  %-22s %s\n", left, o->help);
    else
        fprintf(f, "  %s\n  %-22s %s\n", left, "", o->help);
}

static void synopsis(FILE *f, const fm_cli_cmd *c)
{
    bool any = c->opts[0].name || (c->flags & FM_CLI_CONFIG);
    fprintf(f, "usage: fleetml %s%s%s%s\n", c->name, c->args ? " " : "", c->args ? c->args : "",
            any ? " [options]" : "");
}

static void print_cmd_help(FILE *f, const fm_cli_cmd *c)
{
    fprintf(f, "fleetml %s - %s\n\n", c->name, c->summary);
    synopsis(f, c);
    if (c->text)
        fprintf(f, "\n%s\n", c->text);
    fprintf(f, "\noptions:\n");
    for (size_t i = 0; i < FM_CLI_OPTS_MAX && c->opts[i].name; i++)
        opt_line(f, &c->opts[i]);
    if (c->flags & FM_CLI_CONFIG)
        for (size_t i = 0; i < sizeof config_opts / sizeof config_opts[0]; i++)
            opt_line(f, &config_opts[i]);
    opt_line(f, &help_opt);
    fprintf(f, "\nexit status: 0 done, 1 failed, 2 usage error\n");
    if (c->examples[0]) {
        fprintf(f, "\nexamples:\n");
        for (size_t i = 0; i < 4 && c->examples[i]; i++)
            fprintf(f, "  %s\n", c->examples[i]);
    }
}

static void print_group_help(FILE *f, const group *g)
{
    const fm_cli_cmd *c = &g->cmds[0];
    fprintf(f, "fleetml %s - %s\n\nusage: fleetml %s <subcommand> [options]\n", g->name,
            c->summary, g->name);
    if (c->text)
        fprintf(f, "\n%s\n", c->text);
    fprintf(f, "\nsubcommands:\n");
    for (const fm_cli_cmd *s = g->cmds + 1; s->name; s++)
        if (!(s->flags & FM_CLI_HIDDEN))
            fprintf(f, "  %-12s %s\n", last_word(s->name), s->summary);
    fprintf(f, "\nexit status: 0 done, 1 failed, 2 usage error\n"
               "see 'fleetml help %s <subcommand>' for one subcommand's options\n",
            g->name);
}

static void print_overview(FILE *f)
{
    fprintf(f, "fleetml %s - IoT and machine-learning platform for blood-viscosity meters\n\n"
               "usage: fleetml <command> [<subcommand>] [options]\n"
               "       fleetml help [<command> [<subcommand>]]\n\ncommands:\n",
            FM_VERSION);
    for (size_t i = 0; i < NGROUPS; i++)
        if (!(groups[i].cmds[0].flags & FM_CLI_HIDDEN))
            fprintf(f, "  %-9s %s\n", groups[i].name, groups[i].cmds[0].summary);
    fprintf(f, "\ncommon options: --data DIR (default ./var), --set section.key=value, --help\n"
               "exit status: 0 done, 1 failed, 2 usage error\n"
               "see 'fleetml help <command>', or man fleetml\n");
}

/* The table entry named name ("device add"), or NULL. */
static const fm_cli_cmd *find_cmd(const char *name)
{
    for (size_t g = 0; g < NGROUPS; g++)
        for (const fm_cli_cmd *c = groups[g].cmds; c->name; c++)
            if (strcmp(c->name, name) == 0)
                return c;
    return NULL;
}

void fm_cli_usage(const char *cmd)
{
    const fm_cli_cmd *c = find_cmd(cmd);
    if (c)
        synopsis(stderr, c);
    fprintf(stderr, "see 'fleetml help %s'\n", cmd);
}

int fm_cli_usage_error(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "fleetml %s: ", cmd);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fm_cli_usage(cmd);
    return 2;
}

/* ---- the man page -------------------------------------------------------------- */

/* Writes s for roff: backslashes and hyphens escaped, a leading dot or quote
 * protected. */
static void roff(FILE *f, const char *s)
{
    bool bol = true;
    for (; *s; s++) {
        if (bol && (*s == '.' || *s == '\''))
            fputs("\\&", f);
        bol = *s == '\n';
        if (*s == '\\')
            fputs("\\e", f);
        else if (*s == '-')
            fputs("\\-", f);
        else
            fputc(*s, f);
    }
}

static void man_opt(FILE *f, const fm_cli_opt *o)
{
    fputs(".TP\n\\fB", f);
    roff(f, o->name);
    fputs("\\fR", f);
    if (o->arg) {
        fputs(" \\fI", f);
        roff(f, o->arg);
        fputs("\\fR", f);
    }
    fputs("\n", f);
    roff(f, o->help);
    fputs("\n", f);
}

/* A command's heading, summary and text (a group's section is only this). */
static void man_heading(FILE *f, const fm_cli_cmd *c)
{
    fputs(".SS \"fleetml ", f);
    roff(f, c->name);
    if (c->args) {
        fputc(' ', f);
        roff(f, c->args);
    }
    fputs("\"\n", f);
    roff(f, c->summary);
    fputs(".\n", f);
    if (c->text) {
        fputs(".PP\n", f);
        roff(f, c->text);
        fputs("\n", f);
    }
}

static void man_cmd(FILE *f, const fm_cli_cmd *c)
{
    man_heading(f, c);
    for (size_t i = 0; i < FM_CLI_OPTS_MAX && c->opts[i].name; i++)
        man_opt(f, &c->opts[i]);
    if (c->flags & FM_CLI_CONFIG)
        fputs(".TP\n\\fB\\-\\-data\\fR \\fIDIR\\fR, \\fB\\-\\-set\\fR \\fIKEY=VALUE\\fR\n"
              "the data directory and setting overrides (see OPTIONS)\n",
              f);
    for (size_t i = 0; i < 4 && c->examples[i]; i++) {
        fputs(i == 0 ? ".PP\nExample:\n.RS\n.nf\n" : "", f);
        roff(f, c->examples[i]);
        fputs("\n", f);
    }
    if (c->examples[0])
        fputs(".fi\n.RE\n", f);
}

static void print_man(FILE *f)
{
    fprintf(f, ".TH FLEETML 1 \"\" \"fleetml %s\" \"fleetml manual\"\n", FM_VERSION);
    fputs(".SH NAME\nfleetml \\- IoT and machine\\-learning platform for blood\\-viscosity "
          "meters\n.SH SYNOPSIS\n.B fleetml\n.I command\n[\\fIsubcommand\\fR] "
          "[\\fIoptions\\fR]\n.br\n.B fleetml help\n[\\fIcommand\\fR "
          "[\\fIsubcommand\\fR]]\n"
          ".SH DESCRIPTION\nfleetml onboards devices over MQTT with mutual TLS, stores every "
          "measurement durably, answers each with a model's result, keeps a data lake for "
          "training, and serves an HTTP API and a dashboard. One binary runs every part; "
          "the commands below set it up, run it and look after it.\n"
          ".SH OPTIONS\nCommands that read the configuration take:\n",
          f);
    for (size_t i = 0; i < sizeof config_opts / sizeof config_opts[0]; i++)
        man_opt(f, &config_opts[i]);
    man_opt(f, &help_opt);
    fputs(".SH COMMANDS\n", f);
    for (size_t i = 0; i < NGROUPS; i++) {
        if (groups[i].cmds[0].flags & FM_CLI_HIDDEN)
            continue;
        for (const fm_cli_cmd *c = groups[i].cmds; c->name; c++) {
            if (c->flags & FM_CLI_HIDDEN)
                continue;
            if (c == groups[i].cmds && has_subs(&groups[i]))
                man_heading(f, c);
            else
                man_cmd(f, c);
        }
    }
    fputs(".SH EXIT STATUS\n.TP\n0\ndone\n.TP\n1\nfailed (the message says why)\n.TP\n2\n"
          "usage error: an unknown command or option, or a missing or bad argument\n"
          ".SH FILES\n.TP\n.I <data>/fleetml.conf\nthe settings (docs/operations.md)\n"
          ".SH SEE ALSO\n.BR mosquitto (8),\n.BR psql (1);\n"
          "docs/operations.md, docs/protocol.md and docs/openapi.yaml in the source.\n",
          f);
}

/* ---- bash completion ----------------------------------------------------------- */

static void words_of(FILE *f, const fm_cli_cmd *c)
{
    for (size_t i = 0; i < FM_CLI_OPTS_MAX && c->opts[i].name; i++)
        fprintf(f, " %s", c->opts[i].name);
    if (c->flags & FM_CLI_CONFIG)
        fputs(" --data --set", f);
    fputs(" --help", f);
}

/* The group's visible subcommand words, space-separated. */
static void sub_words(FILE *f, const group *g)
{
    const char *sep = "";
    for (const fm_cli_cmd *c = g->cmds + 1; c->name; c++)
        if (!(c->flags & FM_CLI_HIDDEN)) {
            fprintf(f, "%s%s", sep, last_word(c->name));
            sep = " ";
        }
}

/* Options whose value is a file or a directory. */
static bool arg_is_path(const char *arg)
{
    return arg && (strstr(arg, "DIR") || strstr(arg, "FILE") || strstr(arg, "PATH"));
}

static void print_completion(FILE *f)
{
    fputs("# bash completion for fleetml (generated by `fleetml help --completion`)\n"
          "_fleetml_names() {\n"
          "    local data=\"\" i\n"
          "    for ((i = 1; i < ${#COMP_WORDS[@]} - 1; i++)); do\n"
          "        [[ ${COMP_WORDS[i]} == --data ]] && data=${COMP_WORDS[i+1]}\n"
          "    done\n"
          "    \"${COMP_WORDS[0]}\" \"$1\" list -q ${data:+--data \"$data\"} 2>/dev/null\n"
          "}\n"
          "_fleetml() {\n"
          "    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}\n"
          "    local cmd=${COMP_WORDS[1]} sub=${COMP_WORDS[2]} words=\"\"\n"
          "    COMPREPLY=()\n",
          f);
    /* Values of options: a path completes as a file, anything else not at
     * all (the next option is not a value). */
    fputs("    case $prev in\n", f);
    for (int want_path = 1; want_path >= 0; want_path--) {
        const char *seen[128];
        size_t n = 0;
        if (want_path)
            seen[n++] = "--data";
        else
            seen[n++] = "--set";
        for (size_t g = 0; g < NGROUPS; g++)
            for (const fm_cli_cmd *c = groups[g].cmds; c->name; c++)
                for (size_t i = 0; i < FM_CLI_OPTS_MAX && c->opts[i].name; i++) {
                    const fm_cli_opt *o = &c->opts[i];
                    if (!o->arg || arg_is_path(o->arg) != (want_path == 1))
                        continue;
                    bool dup = false;
                    for (size_t k = 0; k < n && !dup; k++)
                        dup = strcmp(seen[k], o->name) == 0;
                    if (!dup && n < sizeof seen / sizeof seen[0])
                        seen[n++] = o->name;
                }
        fputs("        ", f);
        for (size_t k = 0; k < n; k++)
            fprintf(f, "%s%s", k ? "|" : "", seen[k]);
        fputs(want_path ? ")\n            COMPREPLY=($(compgen -f -- \"$cur\")); return ;;\n"
                        : ")\n            return ;;\n",
              f);
    }
    fputs("    esac\n", f);
    fputs("    if ((COMP_CWORD == 1)); then\n        words=\"help", f);
    for (size_t g = 0; g < NGROUPS; g++)
        if (!(groups[g].cmds[0].flags & FM_CLI_HIDDEN))
            fprintf(f, " %s", groups[g].name);
    fputs("\"\n        COMPREPLY=($(compgen -W \"$words\" -- \"$cur\")); return\n    fi\n"
          "    if [[ $cmd == help ]]; then\n        case $COMP_CWORD in\n"
          "        2) words=\"",
          f);
    for (size_t g = 0; g < NGROUPS; g++)
        if (!(groups[g].cmds[0].flags & FM_CLI_HIDDEN))
            fprintf(f, "%s%s", g ? " " : "", groups[g].name);
    fputs("\" ;;\n        3) case $sub in\n", f);
    for (size_t g = 0; g < NGROUPS; g++) {
        if (!has_subs(&groups[g]))
            continue;
        fprintf(f, "            %s) words=\"", groups[g].name);
        sub_words(f, &groups[g]);
        fputs("\" ;;\n", f);
    }
    fputs("            esac ;;\n        esac\n"
          "        COMPREPLY=($(compgen -W \"$words\" -- \"$cur\")); return\n    fi\n"
          "    case $cmd in\n",
          f);
    for (size_t g = 0; g < NGROUPS; g++) {
        const group *gr = &groups[g];
        if (gr->cmds[0].flags & FM_CLI_HIDDEN)
            continue;
        fprintf(f, "    %s)\n", gr->name);
        if (!has_subs(gr)) {
            fputs("        words=\"", f);
            words_of(f, &gr->cmds[0]);
            fputs("\" ;;\n", f);
            continue;
        }
        fputs("        if ((COMP_CWORD == 2)); then\n            words=\"", f);
        sub_words(f, gr);
        fputs("\"\n        else\n            case $sub in\n", f);
        for (const fm_cli_cmd *c = gr->cmds + 1; c->name; c++) {
            fprintf(f, "            %s)\n                words=\"", last_word(c->name));
            words_of(f, c);
            fputs("\"\n", f);
            /* A positional that names a device or a template completes
             * from the data directory. */
            const char *kind = !c->args                      ? NULL
                               : strncmp(c->args, "DEVICE", 6) == 0   ? "device"
                               : strncmp(c->args, "TEMPLATE", 8) == 0 ? "template"
                                                                      : NULL;
            if (kind)
                fprintf(f,
                        "                [[ $cur != -* ]] && words=\"$words $(_fleetml_names "
                        "%s)\"\n",
                        kind);
            fputs("                ;;\n", f);
        }
        fputs("            esac\n        fi ;;\n", f);
    }
    fputs("    esac\n    COMPREPLY=($(compgen -W \"$words\" -- \"$cur\"))\n}\n"
          "complete -F _fleetml fleetml\n",
          f);
}

/* ---- the tables as JSON (for tests and tools) ---------------------------------- */

static json_t *opt_json(const fm_cli_opt *o)
{
    return json_pack("{s:s,s:s?,s:s}", "name", o->name, "arg", o->arg, "help", o->help);
}

static void print_json(FILE *f)
{
    json_t *out = json_array();
    for (size_t g = 0; g < NGROUPS; g++)
        for (const fm_cli_cmd *c = groups[g].cmds; c->name; c++) {
            json_t *opts = json_array();
            for (size_t i = 0; i < FM_CLI_OPTS_MAX && c->opts[i].name; i++)
                json_array_append_new(opts, opt_json(&c->opts[i]));
            if (c->flags & FM_CLI_CONFIG)
                for (size_t i = 0; i < sizeof config_opts / sizeof config_opts[0]; i++)
                    json_array_append_new(opts, opt_json(&config_opts[i]));
            json_t *ex = json_array();
            for (size_t i = 0; i < 4 && c->examples[i]; i++)
                json_array_append_new(ex, json_string(c->examples[i]));
            bool group_only = c == groups[g].cmds && has_subs(&groups[g]);
            json_array_append_new(
                out, json_pack("{s:s,s:s,s:s?,s:s,s:b,s:b,s:o,s:o}", "name", c->name, "group",
                               groups[g].name, "args", c->args, "summary", c->summary,
                               "runs", !group_only, "hidden", (c->flags & FM_CLI_HIDDEN) != 0,
                               "options", opts, "examples", ex));
        }
    char *s = json_dumps(out, JSON_INDENT(1));
    json_decref(out);
    if (s)
        fprintf(f, "%s\n", s);
    free(s);
}

/* ---- fleetml help ... ----------------------------------------------------------- */

static int help(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "--man") == 0 && argc == 2) {
        print_man(stdout);
        return 0;
    }
    if (argc >= 2 && strcmp(argv[1], "--completion") == 0 &&
        (argc == 2 || (argc == 3 && strcmp(argv[2], "bash") == 0))) {
        print_completion(stdout);
        return 0;
    }
    if (argc == 2 && strcmp(argv[1], "--json") == 0) {
        print_json(stdout);
        return 0;
    }
    if (argc == 1) {
        print_overview(stdout);
        return 0;
    }
    const group *g = find_group(argv[1]);
    if (!g || argc > 3) {
        fprintf(stderr, "fleetml help: no such command '%s%s%s'\nsee 'fleetml help'\n",
                argv[1], argc > 2 ? " " : "", argc > 2 ? argv[2] : "");
        return 2;
    }
    if (argc == 2) {
        if (has_subs(g))
            print_group_help(stdout, g);
        else
            print_cmd_help(stdout, &g->cmds[0]);
        return 0;
    }
    const fm_cli_cmd *c = has_subs(g) ? find_sub(g, argv[2]) : NULL;
    if (!c) {
        fprintf(stderr, "fleetml help: no such command 'fleetml %s %s'\nsee 'fleetml help %s'\n",
                g->name, argv[2], g->name);
        return 2;
    }
    print_cmd_help(stdout, c);
    return 0;
}

static bool is_help(const char *a) { return strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0; }

/* A token that looks like an option: "-x" or "--x", not "-" (stdin) nor a
 * negative number. */
static bool looks_like_option(const char *a)
{
    return a[0] == '-' && a[1] && !(a[1] >= '0' && a[1] <= '9') && !(a[1] == '.');
}

/* Checks argv[from..] against c's table: help asked, an unknown option, an
 * option without its value. Returns -1 to go on, or an exit status. */
static int check_args(const fm_cli_cmd *c, int argc, char **argv, int from)
{
    for (int i = from; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0)
            break;
        if (is_help(a)) {
            print_cmd_help(stdout, c);
            return 0;
        }
        if (!looks_like_option(a))
            continue;
        const fm_cli_opt *o = find_opt(c, a);
        if (!o)
            return fm_cli_usage_error(c->name, "unknown option '%s'", a);
        if (o->arg) {
            if (i + 1 >= argc)
                return fm_cli_usage_error(c->name, "option '%s' needs a value (%s)", a,
                                          o->arg);
            i++;
        }
    }
    return -1;
}

int fm_cli_main(int argc, char **argv)
{
    if (argc < 2) {
        print_overview(stderr);
        return 2;
    }
    if (is_help(argv[1]))
        return help(1, argv + 1);
    if (strcmp(argv[1], "--version") == 0) {
        printf("fleetml %s\n", FM_VERSION);
        return 0;
    }
    if (strcmp(argv[1], "help") == 0)
        return help(argc - 1, argv + 1);
    const group *g = find_group(argv[1]);
    if (!g) {
        fprintf(stderr, "fleetml: unknown command '%s'\nsee 'fleetml help'\n", argv[1]);
        return 2;
    }
    const fm_cli_cmd *c = &g->cmds[0];
    int from = 2;
    if (has_subs(g)) {
        if (argc < 3 || is_help(argv[2])) {
            print_group_help(argc < 3 ? stderr : stdout, g);
            return argc < 3 ? 2 : 0;
        }
        c = find_sub(g, argv[2]);
        if (!c) {
            fprintf(stderr, "fleetml %s: unknown subcommand '%s'\nsee 'fleetml help %s'\n",
                    g->name, argv[2], g->name);
            return 2;
        }
        from = 3;
    }
    int rc = check_args(c, argc, argv, from);
    if (rc >= 0)
        return rc;
    fm_cli__running = c;
    fm_cli__running_group = g->cmds;
    rc = g->run(argc - 1, argv + 1);
    fm_cli__running = fm_cli__running_group = NULL;
    return rc;
}
