/*
 * The API v1 route table. Every route the server answers is listed here
 * once, with the permission it needs (fleetml/auth.h) and its body limit;
 * `fleetml api routes` prints this table and a test checks each entry is
 * documented in docs/openapi.yaml.
 */
#include "api/api_int.h"

#include <stdio.h>
#include <string.h>

#define R(m, p, act, fn, body) {{m, API_PREFIX p, act}, fn, body}
#define PUBLIC "public"
#define SELF NULL

static const api_route routes[] = {
    R("POST", "/auth/login", PUBLIC, v1_login, API_BODY_SMALL),
    R("POST", "/auth/refresh", PUBLIC, v1_refresh, API_BODY_SMALL),
    R("POST", "/auth/logout", PUBLIC, v1_logout, API_BODY_SMALL),
    R("GET", "/openapi.yaml", SELF, v1_openapi, 0),
    R("GET", "/me", SELF, v1_me, 0),
    R("POST", "/me/password", SELF, v1_me_password, API_BODY_SMALL),
    R("POST", "/me/mfa/totp", SELF, v1_mfa_totp_start, API_BODY_SMALL),
    R("POST", "/me/mfa/totp/confirm", SELF, v1_mfa_totp_confirm, API_BODY_SMALL),
    R("POST", "/me/mfa/totp/disable", SELF, v1_mfa_totp_disable, API_BODY_SMALL),
    R("GET", "/users", "users.manage", v1_users_list, 0),
    R("POST", "/users", "users.manage", v1_users_create, API_BODY_SMALL),
    R("GET", "/users/{username}", "users.manage", v1_user_get, 0),
    R("PUT", "/users/{username}/roles", "users.manage", v1_user_roles, API_BODY_SMALL),
    R("POST", "/users/{username}/disable", "users.manage", v1_user_disable, 0),
    R("POST", "/users/{username}/enable", "users.manage", v1_user_enable, 0),
    R("POST", "/users/{username}/mfa/reset", "users.manage", v1_user_mfa_reset, 0),
    R("GET", "/devices", "devices.read", v1_devices_list, 0),
    R("GET", "/fleet/events", "devices.read", v1_fleet_events, 0),
    R("GET", "/devices/{id}", "devices.read", v1_device_get, 0),
    R("POST", "/devices/{id}/disable", "devices.manage", v1_device_disable, 0),
    R("POST", "/devices/{id}/enable", "devices.manage", v1_device_enable, 0),
    R("POST", "/devices/{id}/revoke", "devices.manage", v1_device_revoke, 0),
    R("GET", "/devices/{id}/shadow", "devices.read", v1_shadow_get, 0),
    R("PATCH", "/devices/{id}/shadow", "devices.manage", v1_shadow_patch, API_BODY_DEFAULT),
    R("GET", "/devices/{id}/measurements", "measurements.read", v1_measurements_list, 0),
    R("GET", "/devices/{id}/events", "measurements.read", v1_device_events, 0),
    R("GET", "/devices/{id}/measurements/{mid}", "measurements.read", v1_measurement_get, 0),
    R("PUT", "/devices/{id}/measurements/{mid}/label", "labels.write", v1_label_put,
      API_BODY_DEFAULT),
    R("GET", "/devices/{id}/measurements/{mid}/labels", "measurements.read", v1_label_history,
      0),
    R("GET", "/devices/{id}/measurements/{mid}/lineage", "measurements.read", v1_lineage, 0),
    R("GET", "/templates", "templates.manage", v1_templates_list, 0),
    R("POST", "/templates", "templates.manage", v1_templates_create, API_BODY_DEFAULT),
    R("POST", "/templates/{name}/claim-cert", "templates.manage", v1_template_claim_cert, 0),
    R("GET", "/models", "models.read", v1_models_list, 0),
    R("POST", "/models/{name}/predict", "models.predict", v1_predict, API_BODY_PREDICT),
    R("POST", "/models/{name}/invocations", "models.predict", v1_model_invocations,
      API_BODY_INVOCATIONS),
    R("POST", "/models/{name}/versions", "models.manage", v1_model_push, API_BODY_MODEL),
    R("GET", "/models/{name}/versions", "models.read", v1_model_versions, 0),
    R("GET", "/models/{name}/versions/{version}", "models.read", v1_model_version_get, 0),
    R("POST", "/models/{name}/versions/{version}/approve", "models.approve", v1_model_approve,
      API_BODY_SMALL),
    R("POST", "/models/{name}/versions/{version}/reject", "models.approve", v1_model_reject,
      API_BODY_SMALL),
    R("GET", "/models/{name}/aliases", "models.read", v1_model_aliases, 0),
    R("GET", "/models/{name}/drift", "models.read", v1_model_drift, 0),
    R("PUT", "/models/{name}/aliases/{alias}", "models.deploy", v1_model_alias_put,
      API_BODY_SMALL),
    R("GET", "/rules", "rules.manage", v1_rules_list, 0),
    R("GET", "/rules/{name}", "rules.manage", v1_rule_get, 0),
    R("PUT", "/rules/{name}", "rules.manage", v1_rule_put, API_BODY_DEFAULT),
    R("DELETE", "/rules/{name}", "rules.manage", v1_rule_delete, 0),
    R("GET", "/rules/{name}/invocations", "rules.manage", v1_rule_invocations, 0),
    R("POST", "/rules/{name}/replay", "rules.manage", v1_rule_replay, API_BODY_SMALL),
    R("GET", "/functions", "rules.manage", v1_functions_list, 0),
    R("GET", "/audit", "audit.read", v1_audit_list, 0),
    R("POST", "/training-jobs", "models.manage", v1_training_job_create, API_BODY_SMALL),
    R("GET", "/training-jobs/{id}", "models.read", v1_training_job_get, 0),
};
#define NROUTES (sizeof routes / sizeof routes[0])

size_t fm_api_route_count(void) { return NROUTES; }

const fm_api_route_info *fm_api_route_at(size_t i)
{
    return i < NROUTES ? &routes[i].info : NULL;
}

/* Matches the path as sent against pattern segment by segment: literal
 * segments compare byte for byte (so an escaped '/' never joins two),
 * {x} matches one non-empty segment, percent-decoded into params.
 * Returns 1 on a match, 0 when the path is another one, -1 when it
 * matches but a parameter decodes to something no parameter may hold. */
static int match(const char *pattern, const char *path, char params[][160], size_t *np)
{
    *np = 0;
    int bad = 0;
    while (*pattern && *path) {
        if (*pattern != '/' || *path != '/')
            return 0;
        pattern++, path++;
        const char *pe = strchr(pattern, '/'), *se = strchr(path, '/');
        size_t pl = pe ? (size_t)(pe - pattern) : strlen(pattern);
        size_t sl = se ? (size_t)(se - path) : strlen(path);
        if (pl > 1 && pattern[0] == '{') {
            if (sl == 0 || *np >= API_MAX_PARAMS)
                return 0;
            if (fm_http_param_decode(path, sl, params[*np], 160) != 0)
                bad = 1;
            (*np)++;
        } else if (pl != sl || memcmp(pattern, path, pl) != 0) {
            return 0;
        }
        pattern += pl, path += sl;
    }
    if (*pattern != '\0' || *path != '\0')
        return 0;
    return bad ? -1 : 1;
}

const api_route *api_route_find(api_req *r, char *allow, size_t allow_len, bool *path_known,
                                bool *bad_param)
{
    const api_route *hit = NULL;
    *path_known = false;
    *bad_param = false;
    allow[0] = '\0';
    for (size_t i = 0; i < NROUTES; i++) {
        char params[API_MAX_PARAMS][160];
        size_t np;
        int m = match(routes[i].info.path, r->url, params, &np);
        if (m == 0)
            continue;
        *path_known = true;
        size_t used = strlen(allow);
        snprintf(allow + used, allow_len - used, "%s%s", used ? ", " : "",
                 routes[i].info.method);
        /* HEAD is GET without the body (libmicrohttpd drops it). */
        bool same = strcmp(routes[i].info.method, r->method) == 0 ||
                    (strcmp(r->method, "HEAD") == 0 && strcmp(routes[i].info.method, "GET") == 0);
        if (!hit && same) {
            hit = &routes[i];
            *bad_param = m < 0;
            for (size_t k = 0; k < np && m > 0; k++) {
                memcpy(r->pbuf[k], params[k], sizeof r->pbuf[k]);
                r->params[k] = r->pbuf[k];
            }
        }
    }
    return hit;
}
