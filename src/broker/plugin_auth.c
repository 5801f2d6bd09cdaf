/*
 * fleetml_auth.so: Mosquitto (2.0, plugin API v5) authentication and ACL
 * plugin that enforces the fleetml device topic contract.
 *
 * Required listener settings (mosquitto.conf, for every listener that loads
 * this plugin; the config generator must emit exactly these):
 *
 *     per_listener_settings false
 *     plugin /path/to/fleetml_auth.so
 *     plugin_opt_service_id fleetml-service     (optional, this is the default)
 *     allow_anonymous false
 *     listener <port> <address>
 *     cafile <ca.crt>
 *     certfile <server.crt>
 *     keyfile <server.key>
 *     require_certificate true
 *     tls_version tlsv1.2                         (minimum; 1.3 is also accepted)
 *     # NOT use_identity_as_username, NOT use_subject_as_username
 *     # no password_file, no acl_file, no other auth plugin
 *
 * Why not use_identity_as_username: tested against Debian's mosquitto
 * 2.0.11, a listener with use_identity_as_username (or
 * use_subject_as_username) copies the certificate CN into the username and
 * never calls MOSQ_EVT_BASIC_AUTH at all, so the client-id == CN rule
 * could not refuse the CONNECT. Without that option, BASIC_AUTH is called
 * for every CONNECT, with or without a username, which is where the rule
 * belongs. Because a future configuration change could silently
 * re-introduce the option, the ACL callback repeats the check (cheaply, per
 * access) and denies everything to a client whose id is not its CN: a
 * misconfiguration then degrades to "connected but useless" instead of
 * "device A acts as device B".
 *
 * The plugin is a MODULE loaded into the broker and deliberately does not
 * link fleetml_core: it uses plain libc allocation and the broker's logging
 * so that it has no global state or dependencies beyond libcrypto.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/asn1.h>
#include <openssl/x509.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
/* CMake builds this module with hidden visibility; the entry points the
 * broker looks up with dlsym() must be exported, so the header that
 * declares them is included with default visibility. */
#pragma GCC visibility push(default)
#include <mosquitto_plugin.h>
#pragma GCC visibility pop

#define AUTH_DEFAULT_SERVICE_ID "fleetml-service"
/* A device id is 3..64 characters; the CN upper bound of RFC 5280 is 64 as
 * well, so anything longer cannot be a valid identity in the first place. */
#define AUTH_ID_MAX 64
#define AUTH_TOPIC_ROOT "fleet/"

struct auth_state {
    mosquitto_plugin_id_t *pid;
    char *service_id;
};

/* Copies an untrusted string (client id, topic) into buf for logging,
 * replacing control and non-ASCII bytes so a client cannot forge log lines. */
static const char *log_safe(const char *s, char *buf, size_t len)
{
    size_t i = 0;
    if (!s)
        s = "(null)";
    for (; s[i] && i + 1 < len; i++) {
        unsigned char c = (unsigned char)s[i];
        buf[i] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
    }
    buf[i] = '\0';
    return buf;
}

/* Device ids are `[a-z0-9][a-z0-9-]{2,63}`: lowercase so they map to one
 * topic level, directory and database key without case folding, and free
 * of MQTT special characters (`/`, `+`, `#`, `$`) by construction. */
static bool valid_device_id(const char *s)
{
    size_t n = strlen(s);
    if (n < 3 || n > AUTH_ID_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        bool alnum = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
        if (!alnum && !(i > 0 && c == '-'))
            return false;
    }
    return true;
}

/* Extracts the single subject CN of the client's certificate into cn.
 * Returns false if there is no certificate, no CN, more than one CN (which
 * different consumers would resolve differently), an embedded NUL, or a CN
 * longer than any valid identity. */
static bool client_cn(struct mosquitto *client, char *cn, size_t cn_len)
{
    X509 *cert = mosquitto_client_certificate(client);
    unsigned char *utf8 = NULL;
    bool ok = false;

    if (!cert)
        return false;
    X509_NAME *name = X509_get_subject_name(cert);
    int idx = name ? X509_NAME_get_index_by_NID(name, NID_commonName, -1) : -1;
    if (idx < 0 || X509_NAME_get_index_by_NID(name, NID_commonName, idx) >= 0)
        goto out;
    ASN1_STRING *data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, idx));
    int n = data ? ASN1_STRING_to_UTF8(&utf8, data) : -1;
    if (n <= 0 || (size_t)n >= cn_len || memchr(utf8, '\0', (size_t)n))
        goto out;
    memcpy(cn, utf8, (size_t)n);
    cn[n] = '\0';
    ok = true;
out:
    OPENSSL_free(utf8);
    X509_free(cert);
    return ok;
}

enum identity { ID_NONE, ID_SERVICE, ID_DEVICE };

/* Classifies a client by its verified certificate: the MQTT client id must
 * equal the CN exactly, and the CN must be the service id or a device id.
 * The client id is the only name the broker uses for routing session state,
 * so binding it to the certificate stops one device from taking over
 * another's session (and its queued messages) by reusing its client id. */
static enum identity classify(const struct auth_state *st, struct mosquitto *client,
                              const char **why)
{
    char cn[AUTH_ID_MAX + 2];
    const char *id = mosquitto_client_id(client);

    if (!client_cn(client, cn, sizeof cn)) {
        *why = "no client certificate with a single usable CN";
        return ID_NONE;
    }
    if (!id || strcmp(id, cn) != 0) {
        *why = "client id does not match certificate CN";
        return ID_NONE;
    }
    if (strcmp(cn, st->service_id) == 0)
        return ID_SERVICE;
    if (valid_device_id(cn))
        return ID_DEVICE;
    *why = "certificate CN is neither the service id nor a valid device id";
    return ID_NONE;
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
    const struct mosquitto_evt_basic_auth *ed = event_data;
    const struct auth_state *st = userdata;
    const char *why = "";
    char idbuf[80];
    (void)event;

    enum identity who = classify(st, ed->client, &why);
    const char *id = log_safe(mosquitto_client_id(ed->client), idbuf, sizeof idbuf);
    if (who == ID_NONE) {
        mosquitto_log_printf(MOSQ_LOG_NOTICE, "fleetml_auth: denied connect for client '%s': %s",
                             id, why);
        return MOSQ_ERR_AUTH;
    }
    mosquitto_log_printf(MOSQ_LOG_INFO, "fleetml_auth: accepted %s '%s'",
                         who == ID_SERVICE ? "service" : "device", id);
    return MOSQ_ERR_SUCCESS;
}

/* True if topic is `fleet/<id>/<rest>` with a non-empty rest. Because the
 * prefix is compared literally, a wildcard can only appear inside rest,
 * i.e. below the device's own level. */
static bool under_device(const char *topic, const char *id)
{
    size_t root = strlen(AUTH_TOPIC_ROOT), idlen = strlen(id);
    if (strncmp(topic, AUTH_TOPIC_ROOT, root) != 0)
        return false;
    topic += root;
    if (strncmp(topic, id, idlen) != 0 || topic[idlen] != '/')
        return false;
    return topic[idlen + 1] != '\0';
}

static bool device_may(const char *id, const char *topic, int access)
{
    if (!topic)
        return false;
    switch (access) {
    case MOSQ_ACL_WRITE:
        /* The broker rejects wildcards in PUBLISH topics itself; checking
         * again keeps this function correct on its own. */
        return under_device(topic, id) && !strpbrk(topic, "+#");
    case MOSQ_ACL_SUBSCRIBE:
    case MOSQ_ACL_UNSUBSCRIBE:
        /* `$share/...` and `$SYS/...` start with '$' and so never match the
         * literal "fleet/" prefix: devices cannot join the service's group. */
        return under_device(topic, id);
    case MOSQ_ACL_READ:
        return under_device(topic, id);
    default:
        return false;
    }
}

static const char *access_name(int access)
{
    switch (access) {
    case MOSQ_ACL_READ: return "read";
    case MOSQ_ACL_WRITE: return "write";
    case MOSQ_ACL_SUBSCRIBE: return "subscribe";
    case MOSQ_ACL_UNSUBSCRIBE: return "unsubscribe";
    default: return "unknown";
    }
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
    const struct mosquitto_evt_acl_check *ed = event_data;
    const struct auth_state *st = userdata;
    const char *why = "";
    char idbuf[80], topicbuf[160];
    (void)event;

    enum identity who = classify(st, ed->client, &why);
    if (who == ID_SERVICE)
        return MOSQ_ERR_SUCCESS;
    if (who == ID_DEVICE && device_may(mosquitto_client_id(ed->client), ed->topic, ed->access))
        return MOSQ_ERR_SUCCESS;
    if (who == ID_DEVICE)
        why = "topic outside fleet/<id>/";
    mosquitto_log_printf(MOSQ_LOG_NOTICE, "fleetml_auth: denied %s of '%s' for client '%s': %s",
                         access_name(ed->access), log_safe(ed->topic, topicbuf, sizeof topicbuf),
                         log_safe(mosquitto_client_id(ed->client), idbuf, sizeof idbuf), why);
    return MOSQ_ERR_ACL_DENIED;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
    for (int i = 0; i < supported_version_count; i++) {
        if (supported_versions[i] == 5)
            return 5;
    }
    return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
                          struct mosquitto_opt *options, int option_count)
{
    const char *service_id = AUTH_DEFAULT_SERVICE_ID;
    for (int i = 0; i < option_count; i++) {
        if (options[i].key && strcmp(options[i].key, "service_id") == 0 && options[i].value)
            service_id = options[i].value;
    }
    /* The service id becomes a client id compared against CNs; a value with
     * topic special characters or an empty one is a configuration mistake. */
    if (!*service_id || strlen(service_id) > AUTH_ID_MAX || strpbrk(service_id, "/+#$")) {
        mosquitto_log_printf(MOSQ_LOG_ERR, "fleetml_auth: invalid plugin_opt_service_id");
        return MOSQ_ERR_INVAL;
    }

    struct auth_state *st = calloc(1, sizeof *st);
    if (!st)
        return MOSQ_ERR_NOMEM;
    st->pid = identifier;
    st->service_id = strdup(service_id);
    if (!st->service_id) {
        free(st);
        return MOSQ_ERR_NOMEM;
    }
    int rc = mosquitto_callback_register(identifier, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, st);
    if (rc == MOSQ_ERR_SUCCESS) {
        rc = mosquitto_callback_register(identifier, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, st);
        if (rc != MOSQ_ERR_SUCCESS)
            mosquitto_callback_unregister(identifier, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
    }
    if (rc != MOSQ_ERR_SUCCESS) {
        free(st->service_id);
        free(st);
        return rc;
    }
    *userdata = st;
    mosquitto_log_printf(MOSQ_LOG_INFO, "fleetml_auth: loaded (service id '%s')", st->service_id);
    return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
    struct auth_state *st = userdata;
    (void)options;
    (void)option_count;
    if (!st)
        return MOSQ_ERR_SUCCESS;
    mosquitto_callback_unregister(st->pid, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
    mosquitto_callback_unregister(st->pid, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
    free(st->service_id);
    free(st);
    return MOSQ_ERR_SUCCESS;
}
