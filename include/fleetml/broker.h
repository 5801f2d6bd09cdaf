/*
 * Broker supervision: fleetml generates a Mosquitto configuration from its
 * own config and runs `mosquitto` as a child process, restarting it with
 * backoff when it dies and stopping it on shutdown.
 *
 * Listeners:
 *   - devices: <broker.bind>:<broker.port>, TLS >= 1.2, client certificate
 *     required (from the fleetml CA), identity checked by the fleetml_auth
 *     plugin (client id == certificate CN; topic namespace per device);
 *   - service: 127.0.0.1:<broker.service_port>, same TLS, used by fleetml
 *     itself with the service certificate;
 *   - service socket (broker.service_transport = unix, the default): a Unix
 *     socket in <data>/broker/service/, a directory only the broker's user
 *     (and root) can enter. The plugin takes a client on that socket with a
 *     service client id for the service: the file permissions stand in for
 *     the certificate, and no TLS is spent on the busiest connection.
 */
#ifndef FLEETML_BROKER_H
#define FLEETML_BROKER_H

#include "fleetml/config.h"
#include "fleetml/core.h"
#include <sys/types.h>

typedef struct fm_broker fm_broker;

/* Renders the Mosquitto configuration for cfg into *out (caller frees with
 * fm_free). plugin_path is the fleetml_auth.so to load; run_as_user is the
 * `user` line (e.g. "mosquitto" or "root"). Returns 0 or FM_ENOMEM. */
int fm_broker_render_config(const fm_config *cfg, const char *plugin_path,
                            const char *run_as_user, char **out);

/* Generates the config under <data>/broker/, stops a broker left over by a
 * previous fleetml process (from its pid file), starts mosquitto and a
 * supervision thread. Returns 0 and *out, or FM_ENOTFOUND (mosquitto or the
 * plugin missing) / FM_EIO with err set. */
int fm_broker_start(const fm_config *cfg, fm_broker **out, fm_errbuf *err);

/* The service's Unix socket path for cfg into buf: 0 when the service uses
 * it (supervised mode, broker.service_transport = unix, and the path fits a
 * socket address), FM_ENOTFOUND when the service uses TLS instead. The
 * broker's config and the service's client both ask here, so they agree. */
int fm_broker_service_socket(const fm_config *cfg, char *buf, size_t len);

/* Current child pid (0 while it is being restarted). */
pid_t fm_broker_pid(const fm_broker *b);

/* Stops the child (SIGTERM, then SIGKILL after 5 s), joins the supervision
 * thread and frees b. */
void fm_broker_stop(fm_broker *b);

#endif
