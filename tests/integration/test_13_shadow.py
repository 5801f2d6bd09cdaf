"""Device shadow (issue 3): a versioned JSON document per device with
`reported` (written by the device) and `desired` (written by the platform)
state, at most 8 KiB.  The device talks to it under fleet/<id>/shadow/.
"""

import json
import os
import re
from datetime import datetime

import pytest

from helpers import check_against_schema, unique_id

DENIED = 0x80
DEVICES = ["shd-doc", "shd-delta", "shd-get", "shd-big", "shd-grow", "shd-bad"]


@pytest.fixture(scope="module")
def plat(module_platform):
    return module_platform("shadow", devices=DEVICES)


def shadow_device(p, devices, device_id):
    d = devices(p, device_id).connect()
    for t in ("document", "delta", "rejected"):
        codes = d.subscribe(f"fleet/{device_id}/shadow/{t}")
        assert all(c < DENIED for c in codes), f"SUBACK {codes} for shadow/{t}"
    return d


def topic(d, leaf):
    return f"fleet/{d.device_id}/shadow/{leaf}"


def check_document(doc):
    assert set(doc) >= {"state", "version", "updated_at"}, doc
    assert isinstance(doc["version"], int) and not isinstance(doc["version"], bool), doc
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)",
                        doc["updated_at"]), doc
    datetime.fromisoformat(doc["updated_at"].replace("Z", "+00:00"))
    state = doc["state"]
    assert isinstance(state, dict), doc
    return state.get("desired") or {}, state.get("reported") or {}


def exchange(d, leaf, payload, answer=("document", "rejected"), **kw):
    """Publishes to shadow/<leaf> and returns the first answer Message on
    one of the `answer` leaves."""
    want = {topic(d, a) for a in answer}
    since = d.mark()
    d.publish(payload, topic=topic(d, leaf), **kw)
    m = d.wait_message(lambda m: m.topic in want, timeout=10, since=since,
                       what=f"answer to shadow/{leaf} on {sorted(want)}")
    check_against_schema(f"shadow-{m.topic.rsplit('/', 1)[1]}.v1.json", m.json())
    return m


def update(d, reported):
    m = exchange(d, "update", {"reported": reported})
    assert m.topic == topic(d, "document"), f"update {reported} refused: {m.payload!r}"
    return m.json()


def get(d, payload=b"{}"):
    m = exchange(d, "get", payload, answer=("document",))
    return m.json()


def set_desired(p, device_id, desired):
    r = p.cli("device", "shadow", device_id, "--desired", json.dumps(desired))
    return json.loads(r.stdout)


def test_reported_updates_version(plat, devices):
    d = shadow_device(plat, devices, "shd-doc")
    doc1 = update(d, {"temp": 37, "fw": "1.0", "nested": {"a": 1, "b": [1, 2]}})
    _, rep = check_document(doc1)
    assert rep == {"temp": 37, "fw": "1.0", "nested": {"a": 1, "b": [1, 2]}}, doc1
    v1 = doc1["version"]

    # Merge: keys are set, null deletes, objects merge recursively.
    doc2 = update(d, {"temp": 38, "fw": None, "nested": {"c": True}})
    _, rep = check_document(doc2)
    assert doc2["version"] == v1 + 1, f"version {v1} -> {doc2['version']}"
    assert rep == {"temp": 38, "nested": {"a": 1, "b": [1, 2], "c": True}}, doc2

    # get returns the same document without changing the version, and so
    # does the CLI.
    doc3 = get(d)
    assert doc3["version"] == doc2["version"] and doc3["state"] == doc2["state"], doc3
    cli = json.loads(plat.cli("device", "shadow", "shd-doc").stdout)
    assert cli["version"] == doc2["version"] and cli["state"] == doc2["state"], cli


def test_desired_delta(plat, devices):
    d = shadow_device(plat, devices, "shd-delta")
    update(d, {"rate": 1, "mode": "eco", "cfg": {"a": 1, "b": 1}})

    since = d.mark()
    cli = set_desired(plat, "shd-delta",
                      {"rate": 5, "mode": "eco", "cfg": {"a": 1, "b": 2}, "led": "on"})
    desired, _ = check_document(cli)
    assert desired == {"rate": 5, "mode": "eco", "cfg": {"a": 1, "b": 2}, "led": "on"}, cli
    m = d.wait_message(lambda m: m.topic == topic(d, "delta"), timeout=5, since=since,
                       what="shadow/delta after setting desired")
    delta = m.json()
    check_against_schema("shadow-delta.v1.json", delta)
    # Only what differs from reported, recursively.
    assert delta.get("state") == {"rate": 5, "cfg": {"b": 2}, "led": "on"}, delta
    assert delta.get("version") == cli["version"], (delta, cli["version"])

    # A reported update that still leaves differences gets a new delta
    # listing only them.
    since = d.mark()
    doc = update(d, {"rate": 5, "cfg": {"b": 2}})
    m = d.wait_message(lambda m: m.topic == topic(d, "delta"), timeout=5, since=since,
                       what="shadow/delta after a partial report")
    delta = m.json()
    assert delta.get("state") == {"led": "on"}, delta
    assert delta.get("version") == doc["version"], (delta, doc["version"])


def test_get_with_response_topic_and_correlation(plat, devices):
    d = shadow_device(plat, devices, "shd-get")
    doc = update(d, {"k": "v"})
    mine = f"fleet/{d.device_id}/replies/shadow"
    assert all(c < DENIED for c in d.subscribe(mine))
    corr = os.urandom(12)
    since = d.mark()
    d.publish(b"{}", topic=topic(d, "get"), response_topic=mine, correlation=corr)
    m = d.wait_message(lambda m: m.topic == mine, timeout=10, since=since,
                       what=f"shadow document on the response topic {mine}")
    assert m.correlation == corr, f"correlation {m.correlation!r} != {corr!r}"
    assert m.json()["version"] == doc["version"] and m.json()["state"] == doc["state"]

    # Barrier: a plain get is answered on shadow/document; by then a copy of
    # the first answer on shadow/document would have arrived too.
    plain = get(d)
    assert plain["version"] == doc["version"]
    docs = d.messages_matching(lambda x: x.topic == topic(d, "document"), since)
    assert len(docs) == 1, f"response-topic get also answered on shadow/document: {docs}"
    assert docs[0].correlation is None

    # A response topic outside the device's namespace is not honoured.
    since = d.mark()
    d.publish(b"{}", topic=topic(d, "get"), response_topic="fleet/shd-doc/shadow/document",
              correlation=b"x")
    m = d.wait_message(lambda m: m.topic == topic(d, "document"), timeout=10, since=since,
                       what="get with a foreign response topic answered on shadow/document")
    assert m.json()["version"] == doc["version"]


def test_get_with_empty_payload(make_platform, devices):
    # "Any payload" includes none at all, the most natural get.  Own
    # platform: if this kills serve, the other shadow tests still run.
    p = make_platform(devices=["shd-empty"], name="shadow-empty")
    d = shadow_device(p, devices, "shd-empty")
    doc = update(d, {"k": 1})
    got = get(d, payload=b"")
    assert got["version"] == doc["version"] and got["state"] == doc["state"], got
    p._check_alive()


def test_oversize_update_rejected(plat, devices):
    d = shadow_device(plat, devices, "shd-big")
    doc = update(d, {"small": 1})
    m = exchange(d, "update", {"reported": {"blob": "x" * (9 * 1024)}})
    assert m.topic == topic(d, "rejected"), f"9 KiB update not rejected: {m.payload[:200]!r}"
    rej = m.json()
    assert rej.get("code") == "too_large", rej
    assert isinstance(rej.get("message"), str) and rej["message"], rej
    after = get(d)
    assert after["version"] == doc["version"] and after["state"] == doc["state"], after


def test_document_growth_beyond_limit_rejected(plat, devices):
    # Each update is small; together they would exceed 8 KiB.
    d = shadow_device(plat, devices, "shd-grow")
    doc = update(d, {"a": "x" * 3000})
    doc = update(d, {"b": "y" * 3000})
    m = exchange(d, "update", {"reported": {"c": "z" * 3000}})
    assert m.topic == topic(d, "rejected"), (
        f"update making the document > 8 KiB accepted: {len(m.payload)} bytes")
    assert m.json().get("code") == "too_large", m.json()
    after = get(d)
    assert after["version"] == doc["version"], after


@pytest.mark.parametrize("payload", [b"not json", b"[]", b'{"reported": 5}'],
                         ids=["not-json", "array", "reported-number"])
def test_invalid_update_rejected(plat, devices, payload):
    d = shadow_device(plat, devices, "shd-bad")
    before = get(d)
    m = exchange(d, "update", payload)
    assert m.topic == topic(d, "rejected"), f"{payload!r} accepted: {m.payload!r}"
    assert m.json().get("code") == "invalid_request", m.json()
    assert get(d)["version"] == before["version"]


def test_device_cannot_set_desired(plat, devices):
    d = shadow_device(plat, devices, "shd-bad")
    mark = unique_id("desired")
    m = exchange(d, "update", {"desired": {"forged": mark}, "reported": {"ok": 1}})
    doc = get(d)
    desired, _ = check_document(doc)
    assert "forged" not in desired, f"a device wrote desired state: {doc} (answer {m.payload!r})"
