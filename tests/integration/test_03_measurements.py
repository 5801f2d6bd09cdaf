"""The core loop: a device publishes a measurement and gets a result.

Covers issue acceptance items 1 (ok within 1 s), 2 (rejections), 5 (repeated
measurement id) and 6 (MQTT 5 response topic + correlation data)."""

import json
import math
import os
import re
from datetime import datetime

import pytest

from helpers import encode, make_measurement, make_sweep, true_eta_pas, unique_id, wait_for

OUTPUTS = ("viscosity_high_mpas", "viscosity_low_mpas", "hematocrit_pct")


def parse_rfc3339(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def assert_ok_reply(reply, mid):
    r = reply.json()
    assert r.get("status") == "ok", f"expected ok, got {r}"
    assert r.get("id") == mid
    assert re.fullmatch(r"viscosity@\S+", r.get("model", "")), r
    parse_rfc3339(r["received_at"])
    outs = r.get("outputs")
    assert isinstance(outs, dict), r
    for k in OUTPUTS:
        v = outs.get(k)
        assert isinstance(v, (int, float)) and not isinstance(v, bool), f"{k}={v!r}"
        assert math.isfinite(v), f"{k}={v!r}"
    return r


def test_valid_measurement_ok_within_1s(platform, connected):
    d = connected(platform, "dev-latency")
    latencies = []
    for _ in range(5):
        mid = unique_id("lat")
        reply, lat = d.measure(make_measurement(mid), timeout=5)
        r = assert_ok_reply(reply, mid)
        latencies.append(lat)
        # The reply is only sent once the measurement is committed.
        rows = platform.query("SELECT tenant, model, result FROM measurements "
                              "WHERE device_id = ? AND measurement_id = ?", d.device_id, mid)
        assert len(rows) == 1, f"{mid} not stored when its ok reply arrived"
        assert rows[0][0] == "demo-hospital"
        assert rows[0][1] == r["model"]
    print(f"reply latencies (s): {[round(x, 4) for x in latencies]}")
    assert max(latencies) < 1.0, f"latencies {latencies}"


def test_outputs_plausible(platform, connected):
    d = connected(platform, "dev-ok")
    mid = unique_id("plaus")
    reply, _ = d.measure(make_measurement(mid), timeout=5)
    outs = assert_ok_reply(reply, mid)["outputs"]
    hi, lo, hct = (outs[k] for k in OUTPUTS)
    # The sweep was built from eta(300) ~ 4.2 mPa*s and eta(1) ~ 9.8 mPa*s.
    want_hi, want_lo = true_eta_pas(300) * 1e3, true_eta_pas(1) * 1e3
    assert want_hi / 1.5 <= hi <= want_hi * 1.5, f"viscosity_high_mpas={hi}, sweep had {want_hi:.2f}"
    assert want_lo / 2 <= lo <= want_lo * 2, f"viscosity_low_mpas={lo}, sweep had {want_lo:.2f}"
    assert lo > hi, f"blood is shear-thinning: low-shear {lo} <= high-shear {hi}"
    assert 10 <= hct <= 80, f"hematocrit_pct={hct}"


def _payload_with_number(mid, text):
    raw = encode(make_measurement(mid)).decode()
    out = raw.replace('"temperature_c":37.0', f'"temperature_c":{text}')
    assert out != raw
    return out.encode()


def _oversize(mid):
    doc = make_measurement(mid)
    doc["firmware"] = "x" * (140 * 1024)
    b = encode(doc)
    assert len(b) > 128 * 1024
    return b


def _without(mid, field):
    doc = make_measurement(mid)
    del doc[field]
    return encode(doc)


def _bad_samples(mid):
    doc = make_measurement(mid)
    doc["sweep"][2]["samples"] = "not-an-array"
    return encode(doc)


def _narrow_sweep(mid):
    return encode(make_measurement(mid, sweep=make_sweep(rates=[50, 100, 200, 300])))


# (name, payload builder, code, words the message must mention, reply id known)
REJECTIONS = [
    ("malformed", lambda mid: b'{"id": "' + mid.encode() + b'", "taken_at": ',
     "malformed_json", [], False),
    ("missing", lambda mid: _without(mid, "taken_at"), "missing_field", ["taken_at"], True),
    ("missing-id", lambda mid: _without(mid, "id"), "missing_field", ["id"], False),
    ("nonfinite", lambda mid: _payload_with_number(mid, "1e999"), "malformed_json",
     ["1e999"], False),
    ("oversize", _oversize, "payload_too_large", [], False),
    ("kind", lambda mid: encode(make_measurement(mid, kind="viscosity.sweep.v9")),
     "unknown_kind", ["kind"], True),
    ("type", _bad_samples, "invalid_type", ["sweep[2].samples"], True),
    ("unknown-field", lambda mid: encode(make_measurement(mid, colour="red")),
     "unknown_field", ["colour"], True),
    ("range", _narrow_sweep, "out_of_range", [], True),
    ("empty", lambda mid: b"", "malformed_json", ["empty"], False),
]


@pytest.mark.parametrize("name,build,code,words,id_known", REJECTIONS,
                         ids=[r[0] for r in REJECTIONS])
def test_rejected_payload(platform, connected, name, build, code, words, id_known):
    d = connected(platform, "dev-err")
    mid = unique_id(f"bad-{name}")
    payload = build(mid)
    q_before = len([r for r in platform.quarantine_rows(d.device_id) if r[0] == code])

    since = d.mark()
    d.publish(payload)
    reply = d.wait_message(
        lambda m: m.topic == d.results_topic and m.json().get("status") == "error"
        and m.json().get("id") in ("", mid),
        timeout=5, since=since, what=f"error reply for {name}")
    r = reply.json()
    err = r.get("error")
    assert isinstance(err, dict), r
    assert err.get("code") == code, f"expected {code}, got {r}"
    msg = err.get("message")
    print(f"{name}: {r}")
    assert isinstance(msg, str) and msg.strip(), r
    for w in words:
        assert w in msg, f"message {msg!r} does not mention {w!r}"
    if id_known:
        assert r.get("id") == mid, r
    else:
        assert r.get("id") in ("", mid), r

    # Nothing of this device is ever stored; the rejection is quarantined.
    assert platform.count_measurements(d.device_id) == 0
    assert platform.query("SELECT count(*) FROM measurements WHERE measurement_id = ?",
                          mid)[0][0] == 0

    def quarantined():
        rows = [r for r in platform.quarantine_rows(d.device_id) if r[0] == code]
        return len(rows) > q_before and rows
    rows = wait_for(quarantined, 10, msg=f"a quarantine row with code {code}")
    assert rows[-1][1], "quarantine row without error_message"


def test_repeated_id_stored_once_same_reply(platform, connected):
    d = connected(platform, "dev-dup")
    mid = unique_id("dup")
    payload = encode(make_measurement(mid))
    first, _ = d.measure(payload, mid=mid)
    assert_ok_reply(first, mid)
    second, _ = d.measure(payload, mid=mid)
    assert second.payload == first.payload, (
        f"repeat answered differently:\n{first.payload!r}\n{second.payload!r}")
    assert platform.count_measurements(d.device_id, mid) == 1

    # A device that reuses the id for different content still gets the
    # original result, and the original row is kept.
    changed = encode(make_measurement(mid, sweep=make_sweep(seed="other"), firmware="it-2.0"))
    third, _ = d.measure(changed, mid=mid)
    assert third.payload == first.payload
    rows = platform.query("SELECT payload FROM measurements WHERE device_id = ? "
                          "AND measurement_id = ?", d.device_id, mid)
    assert len(rows) == 1
    stored = rows[0][0]
    stored = json.loads(stored if isinstance(stored, str) else bytes(stored).decode())
    assert stored == json.loads(payload), "stored payload is not the first one"


def test_response_topic_and_correlation_data(platform, connected):
    d = connected(platform, "dev-corr")
    base = f"fleet/{d.device_id}/replies"
    assert all(c < 0x80 for c in d.subscribe(base + "/#"))

    # Several requests in flight, each with its own topic and correlation.
    reqs = []
    since = d.mark()
    for i in range(3):
        mid = unique_id("corr")
        corr = os.urandom(16)
        topic = f"{base}/r{i}"
        d.publish(make_measurement(mid), response_topic=topic, correlation=corr)
        reqs.append((mid, corr, topic))
    for mid, corr, topic in reqs:
        m = d.wait_reply(mid, timeout=5, since=since, topic=topic)
        assert m.correlation == corr, f"correlation {m.correlation!r} != {corr!r}"
        assert_ok_reply(m, mid)

    # Without the properties the reply goes to the results topic.  Once it
    # has arrived, the earlier replies had their chance to be misrouted.
    plain = unique_id("plain")
    m, _ = d.measure(make_measurement(plain))
    assert_ok_reply(m, plain)
    assert m.correlation is None
    ids = {mid for mid, _, _ in reqs}
    stray = d.messages_matching(
        lambda x: x.topic == d.results_topic and x.json().get("id") in ids, since)
    assert not stray, f"replies also sent to the results topic: {stray}"
    for mid, _, topic in reqs:
        got = d.messages_matching(lambda x: x.json().get("id") == mid, since)
        assert [x.topic for x in got] == [topic], f"{mid}: {got}"

    # Errors honour them too.
    corr = os.urandom(8)
    mid = unique_id("corr-err")
    d.publish(_without(mid, "taken_at"), response_topic=f"{base}/err", correlation=corr)
    m = d.wait_reply(mid, timeout=5, since=since, topic=f"{base}/err")
    assert m.json()["status"] == "error" and m.correlation == corr
