/*
 * The ingest router (include/fleetml/ingest.h): per-message routing, the
 * service-side admission check, immediate answers when a measurement
 * cannot be queued, and their metrics.
 */
#include "fleetml/ingest.h"
#include "fleetml/measurement.h"
#include "fleetml/metrics.h"
#include "fleetml/ratelimit.h"
#include "fleetml/registry.h"

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

struct fm_ingest {
    fm_ingest_opts opts;
    int device_rate, device_burst;
    fm_ratelimit *device_rates; /* used by the MQTT thread only */
};

const char *const *fm_ingest_subscriptions(void)
{
    static const char *const subs[] = {
        "$share/fleetml/fleet/+/measurements",
        "$share/fleetml/fleet/provisioning/+/request",
        "$share/fleetml/fleet/+/cert/rotate",
        "$share/fleetml/fleet/+/shadow/update",
        "$share/fleetml/fleet/+/shadow/get",
        FM_PRESENCE_SUB,
        FM_ADMISSION_TOPIC,
        NULL,
    };
    return subs;
}

int fm_ingest_new(const fm_ingest_opts *opts, fm_ingest **out)
{
    fm_ingest *in = fm_calloc(1, sizeof *in);
    if (!in)
        return FM_ENOMEM;
    in->opts = *opts;
    in->opts.cfg = NULL; /* copied what is needed: the config may not outlive us */
    in->device_rate = opts->cfg->device_rate;
    in->device_burst = opts->cfg->device_burst;
    if (fm_ratelimit_new(&in->device_rates) != 0) {
        fm_free(in);
        return FM_ENOMEM;
    }
    *out = in;
    return 0;
}

void fm_ingest_free(fm_ingest *in)
{
    if (!in)
        return;
    fm_ratelimit_free(in->device_rates);
    fm_free(in);
}

/* The broker plugin's admission report (FM_ADMISSION_TOPIC): counts. */
static void on_admission(const fm_mqtt_msg *mm)
{
    unsigned long long msgs = 0, bytes = 0;
    char text[128];
    if (mm->len >= sizeof text)
        return;
    memcpy(text, mm->payload, mm->len);
    text[mm->len] = '\0';
    if (sscanf(text, "{\"refused_messages\":%llu,\"refused_bytes\":%llu}", &msgs, &bytes) != 2)
        return;
    fm_metrics *mx = fm_metrics_get();
    atomic_fetch_add(&mx->broker_refused_msgs, msgs);
    atomic_fetch_add(&mx->broker_refused_bytes, bytes);
}

static void on_measurement(fm_ingest *in, const char *device, const fm_mqtt_msg *mm)
{
    int rc;
    const char *code = FM_VERR_UNAVAILABLE;
    /* A device over its rate is answered at once, before anything is
     * copied or queued: one flooding device cannot crowd out the rest
     * (behind a broker without fleetml's plugin, which limits it first). */
    if (in->device_rate > 0 &&
        !fm_ratelimit_take(in->device_rates, device, in->device_rate, in->device_burst,
                           fm_mono_ns())) {
        rc = FM_EPERM;
        code = FM_VERR_RATE_LIMITED;
    } else {
        fm_inmsg *m = fm_inmsg_new(device, mm->payload, mm->len, mm->response_topic, mm->corr,
                                   mm->corr_len);
        rc = m ? fm_pipeline_submit(in->opts.pipeline, m) : FM_ENOMEM;
        if (rc == 0)
            return;
        fm_inmsg_free(m);
    }
    /* Overloaded, over rate or stopping: tell the device now so it retries
     * later, rather than holding a message we cannot promise to store. */
    fm_metrics *mx = fm_metrics_get();
    atomic_fetch_add(&mx->received, 1);
    atomic_fetch_add(&mx->rejected[fm_reject_reason_from_code(code)], 1);
    char mid[FM_MEAS_ID_MAX + 1], topic[FM_TOPIC_MAX], doc[1024];
    fm_measurement_peek_id(mm->payload, mm->len, mid);
    size_t n = fm_error_doc(doc, sizeof doc, mid, code,
                            rc == FM_EPERM   ? "this device sends too fast, retry later"
                            : rc == FM_EBUSY ? "platform overloaded, retry later"
                                             : "platform unavailable, retry later");
    if (n) {
        fm_reply_topic(device, mm->response_topic, FM_LEAF_RESULTS, topic, sizeof topic);
        in->opts.publish(in->opts.ud, topic, doc, n, mm->corr, mm->corr_len);
    }
}

void fm_ingest_on_message(void *ud, const fm_mqtt_msg *mm)
{
    fm_ingest *in = ud;
    char device[FM_DEVICE_ID_MAX + 1];
    if (fm_topic_device(mm->topic, FM_LEAF_MEASUREMENTS, device, sizeof device)) {
        on_measurement(in, device, mm);
        return;
    }
    if (strcmp(mm->topic, FM_ADMISSION_TOPIC) == 0) {
        on_admission(mm);
        return;
    }
    if (in->opts.registry && fm_registry_handles(mm->topic)) {
        fm_regmsg_in rm = {.topic = mm->topic, .payload = mm->payload, .len = mm->len,
                           .response_topic = mm->response_topic, .corr = mm->corr,
                           .corr_len = mm->corr_len, .claim_template = mm->claim_template,
                           .cert_serial = mm->cert_serial};
        if (fm_registry_submit(in->opts.registry, &rm) != 0)
            fm_logkv(FM_LOG_WARN, "ingest", "registry queue full; message dropped", "topic",
                     mm->topic, NULL);
        return;
    }
    fm_logkv(FM_LOG_WARN, "ingest", "ignoring message on unexpected topic", "topic", mm->topic,
             NULL);
}
