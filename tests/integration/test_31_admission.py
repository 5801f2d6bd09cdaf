"""Admission at the edge: the broker plugin refuses a device's publishes beyond
its message rate or byte rate before they reach the service, tells the device why
(a `rate_limited` notice on its results topic, from the broker, without an id),
and the service counts the refusals (fleetml_broker_refused_*_total). Other
devices are answered as usual meanwhile."""
import time

import pytest

from helpers import encode, make_measurement, metric_value, unique_id, wait_for

RATE, BURST = 5, 10


@pytest.fixture(scope="module")
def plat(module_platform):
    return module_platform(
        "admission", devices=["adm-flood", "adm-bytes", "adm-good"],
        sets={"pipeline.device_rate": str(RATE), "pipeline.device_burst": str(BURST),
              "pipeline.device_bytes_rate": str(64 * 1024),
              "pipeline.device_bytes_burst": str(200 * 1024)})


def broker_notice(m):
    doc = m.json()
    return (doc.get("status") == "error" and doc["error"]["code"] == "rate_limited"
            and doc.get("id") == "")


def refused(plat, what):
    return metric_value(plat.metrics(), f"fleetml_broker_refused_{what}_total") or 0


def test_message_rate_refused_by_broker(plat, devices):
    flood = devices(plat, "adm-flood").connect()
    good = devices(plat, "adm-good").connect()
    for d in (flood, good):
        d.subscribe(d.results_topic)
    before = refused(plat, "messages")
    since = flood.mark()
    n = 60
    t0 = time.monotonic()
    for i in range(n):
        flood.publish(make_measurement(unique_id(f"flood{i}-")))
    elapsed = time.monotonic() - t0
    # The broker says why, once, without a measurement id.
    flood.wait_message(broker_notice, timeout=15, since=since, what="the broker's notice")
    # ... and the service learns how many it refused.
    wait_for(lambda: refused(plat, "messages") > before, 15,
             msg="fleetml_broker_refused_messages_total to grow")
    # What the broker admitted stays within its bucket; the rest never reached
    # the service (not even as a rate_limited answer from the pipeline).
    admitted_max = BURST + RATE * (elapsed + 1) + 1
    ok_or_answered = lambda: len(flood.messages_matching(
        lambda m: m.json().get("id", "").startswith("flood"), since=since))
    wait_for(lambda: refused(plat, "messages") - before + ok_or_answered() >= n, 20,
             msg="every publish either refused by the broker or answered")
    answered = ok_or_answered()
    assert answered <= admitted_max, f"{answered} answered, at most {admitted_max} admitted"
    assert refused(plat, "messages") - before >= n - admitted_max
    assert plat.count_measurements("adm-flood") <= admitted_max
    # Another device is not affected.
    mid = unique_id("good")
    reply, _ = good.measure(make_measurement(mid), timeout=15)
    assert reply.json()["status"] == "ok"


def test_byte_rate_refused_by_broker(plat, devices):
    dev = devices(plat, "adm-bytes").connect()
    dev.subscribe(dev.results_topic)
    before = refused(plat, "bytes")
    since = dev.mark()
    big = 100 * 1024
    for i in range(6):
        body = b'{"id":"bytes-%d","pad":"' % i
        dev.publish(body + b"a" * (big - len(body) - 2) + b'"}')
    dev.wait_message(broker_notice, timeout=15, since=since, what="the broker's notice")
    # 200 KiB of burst admits two; the rest (at 64 KiB/s) mostly not.
    wait_for(lambda: refused(plat, "bytes") - before >= 2 * big, 15,
             msg="refused bytes to be counted")
    assert refused(plat, "messages") >= 2
