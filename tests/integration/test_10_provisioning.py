"""Provisioning by claim (issue 3): a device that has only a template's claim
certificate obtains its own identity over MQTT.

The device side is plain paho (docs/protocol.md is what is tested, not the
SDK): the claim client `prov-<serial>` subscribes to
fleet/provisioning/<client id>/accepted and .../rejected, publishes its CSR
to .../request, and with the returned certificate connects as the new
device.  Negative delivery checks never sleep: a forbidden publish is
followed by an allowed one on a path processed after it (a barrier).
"""

import json
import os
import re
import stat

import pytest

from helpers import (TENANT, cert_info, check_against_schema, corrupt_csr_signature, make_csr,
                     make_measurement, unique_id, wait_for)

DENIED = 0x80

# Hook that refuses every claim (docs/protocol.md: provisioning hooks).
DENY_HOOK = """#!/usr/bin/python3
import json, sys
req = json.load(sys.stdin)
print(json.dumps({"allow": False, "reason": "it-hook says no"}))
"""


def _setup(p):
    hook = p.workdir / "deny-hook.py"
    hook.write_text(DENY_HOOK)
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    p.cli("template", "add", "open-tpl", "--tenant", TENANT, "--prefix", "it-open")
    p.cli("template", "add", "list-tpl", "--tenant", TENANT, "--serials", "SN-OK-1,SN-OK-2")
    p.cli("template", "add", "hook-tpl", "--tenant", TENANT, "--hook", str(hook))
    p.cli("template", "add", "reprov-tpl", "--tenant", TENANT, "--reprovision")
    p.cli("template", "add", "slow-tpl", "--tenant", TENANT, "--rate", "1")
    p.cli("template", "add", "off-tpl", "--tenant", TENANT)
    for t in ("open-tpl", "list-tpl", "hook-tpl", "reprov-tpl", "slow-tpl", "off-tpl"):
        p.cli("template", "claim-cert", t)


@pytest.fixture(scope="module")
def prov(module_platform):
    return module_platform("prov", setup=_setup)


# --------------------------------------------------------------------------
# Helpers


def expected_device_id(prefix, serial):
    return (prefix + "-" + re.sub(r"[^a-z0-9-]", "-", serial.lower()))[:64]


def claim_client(p, devices, template, serial=None, client_id=None):
    cdir = p.data / "claims" / template
    return devices(p, None, client_id=client_id or f"prov-{serial}",
                   certfile=str(cdir / "claim.crt"), keyfile=str(cdir / "claim.key"))


def request(p, devices, template, serial, csr=None, payload=None, timeout=10):
    """One provisioning exchange; returns ("accepted"|"rejected", document)."""
    c = claim_client(p, devices, template, serial).connect()
    base = f"fleet/provisioning/{c.client_id}"
    for t in (base + "/accepted", base + "/rejected"):
        codes = c.subscribe(t)
        assert all(x < DENIED for x in codes), f"SUBACK {codes} for own topic {t}"
    if payload is None:
        payload = {"serial": serial, "csr": csr, "model": "it-visco", "firmware": "it-1.0"}
    since = c.mark()
    c.publish(payload, topic=base + "/request")
    m = c.wait_message(lambda m: m.topic in (base + "/accepted", base + "/rejected"),
                       timeout=timeout, since=since,
                       what=f"accepted/rejected for {template}/{serial}")
    c.close()
    kind, doc = m.topic.rsplit("/", 1)[1], m.json()
    check_against_schema(f"provisioning-{kind}.v1.json", doc)
    return kind, doc


def assert_rejected(kind, doc, code):
    assert kind == "rejected", f"expected rejected {code}, got {kind}: {doc}"
    assert doc.get("code") == code, f"expected code {code}, got {doc}"
    assert isinstance(doc.get("message"), str) and doc["message"].strip(), doc
    print(f"rejected: {doc}")


def save_identity(tmp_path, doc, name):
    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "device.crt").write_text(doc["certificate_pem"])
    (d / "ca.crt").write_text(doc["ca_pem"])
    return str(d / "device.crt"), str(d / "ca.crt")


def attempt(p, devices, device_id, **kw):
    d = devices(p, device_id, **kw)
    try:
        return d.try_connect(timeout=5)
    finally:
        d.close()


def refused(outcome):
    return outcome not in ("connected", "timeout")


def connect_as(p, devices, device_id, certfile, keyfile, ca_certs):
    """Connects as a freshly provisioned device.  The first attempt must
    succeed: `accepted` tells the device it may connect now."""
    kw = dict(certfile=certfile, keyfile=keyfile, ca_certs=ca_certs)
    d = devices(p, device_id, **kw)
    first = d.try_connect(timeout=5)
    if first != "connected":
        d.close()
        try:
            wait_for(lambda: attempt(p, devices, device_id, **kw) == "connected", 3)
            later = "but a later attempt within 3 s succeeded (race: accepted was sent "\
                    "before the broker knew the device)"
        except AssertionError:
            later = "and no attempt within 3 s succeeded"
        raise AssertionError(f"{device_id} refused right after accepted: {first}, {later}\n"
                             f"{p.log_tail(30)}")
    codes = d.subscribe(d.results_topic)
    assert all(c < DENIED for c in codes), f"SUBACK {codes} for {d.results_topic}"
    return d


def provision(p, devices, tmp_path, template, serial, key="ec"):
    """Claims an identity; returns (accepted doc, key, cert path, ca path)."""
    keyfile, csr = make_csr(tmp_path, f"k-{serial}-{unique_id('x')}", key=key)
    kind, doc = request(p, devices, template, serial, csr)
    assert kind == "accepted", f"{template}/{serial}: {doc}"
    cert, ca = save_identity(tmp_path, doc, f"id-{serial}-{unique_id('x')}")
    return doc, keyfile, cert, ca


# --------------------------------------------------------------------------
# The happy path


@pytest.mark.parametrize("key", ["ec", "rsa2048"])
def test_claim_then_connect_and_measure(prov, devices, tmp_path, key):
    serial = f"SN_Claim-{key}-01"
    keyfile, csr = make_csr(tmp_path, "dev", key=key, cn="someone-else-entirely")
    claim_serial, claim_cn = cert_info(prov.data / "claims" / "open-tpl" / "claim.crt")
    assert claim_cn == "claim:open-tpl", f"claim certificate CN {claim_cn!r}"

    kind, doc = request(prov, devices, "open-tpl", serial, csr)
    assert kind == "accepted", doc
    for k in ("device_id", "certificate_pem", "ca_pem", "endpoint"):
        assert k in doc, f"accepted lacks {k}: {doc}"
    dev_id = doc["device_id"]
    assert dev_id == expected_device_id("it-open", serial), doc
    _, cn = cert_info(doc["certificate_pem"])
    assert cn == dev_id, f"certificate CN {cn!r}: the CSR's subject must be ignored"
    assert cert_info(doc["ca_pem"]) == cert_info(prov.ca_cert), "ca_pem is not the node's CA"
    ep = doc["endpoint"]
    assert isinstance(ep.get("host"), str) and ep["host"], ep
    assert ep.get("port") == prov.broker_port, f"endpoint {ep}, broker on {prov.broker_port}"

    cert, ca = save_identity(tmp_path, doc, "id")
    d = connect_as(prov, devices, dev_id, cert, keyfile, ca)
    mid = unique_id("prov")
    reply, _ = d.measure(make_measurement(mid), timeout=10)
    r = reply.json()
    assert r.get("status") == "ok" and r.get("id") == mid, r
    rows = prov.query("SELECT tenant FROM measurements WHERE device_id = ? AND "
                      "measurement_id = ?", dev_id, mid)
    assert rows == [(TENANT,)], rows


def test_template_added_while_running(prov, devices, tmp_path):
    prov.cli("template", "add", "late-tpl", "--tenant", TENANT)
    prov.cli("template", "claim-cert", "late-tpl")
    wait_for(lambda: attempt(prov, devices, None, client_id="prov-SN-LATE-0",
                             certfile=str(prov.data / "claims/late-tpl/claim.crt"),
                             keyfile=str(prov.data / "claims/late-tpl/claim.key"))
             == "connected", 5, interval=0.1, msg="claim cert of a new template accepted")
    doc, keyfile, cert, ca = provision(prov, devices, tmp_path, "late-tpl", "SN-LATE-1")
    assert doc["device_id"] == "late-tpl-sn-late-1", doc
    connect_as(prov, devices, doc["device_id"], cert, keyfile, ca)


# --------------------------------------------------------------------------
# What a claim certificate may do


def test_claim_client_confined(prov, devices, tmp_path):
    doc, keyfile, cert, ca = provision(prov, devices, tmp_path, "open-tpl", "SN-ACL-1")
    dev_id = doc["device_id"]
    dev = connect_as(prov, devices, dev_id, cert, keyfile, ca)

    c = claim_client(prov, devices, "open-tpl", "SN-ACL-2").connect()
    own = f"fleet/provisioning/{c.client_id}"
    assert all(x < DENIED for x in c.subscribe(own + "/+", keep=False))
    for topic in ("#", "fleet/#", f"fleet/{dev_id}/results", f"fleet/{dev_id}/#",
                  "fleet/provisioning/#", "fleet/provisioning/+/accepted",
                  "fleet/provisioning/prov-SN-ACL-1/accepted", own + "/request",
                  f"fleet/{c.client_id}/results", "$SYS/#"):
        codes = c.subscribe(topic, keep=False)
        assert len(codes) == 1 and codes[0] >= DENIED, (
            f"claim client: SUBACK for {topic} was {[hex(x) for x in codes]}, expected >= 0x80")

    forged = unique_id("claim-telemetry")
    own_ns = unique_id("claim-own-ns")
    since = dev.mark()
    c.publish(make_measurement(forged), topic=f"fleet/{dev_id}/measurements")
    c.publish(make_measurement(own_ns), topic=f"fleet/{c.client_id}/measurements")
    c.publish(make_measurement(own_ns), topic="fleet/anything-at-all/measurements")
    # Another claim client's request topic: if delivered, SN-ACL-9 would be
    # provisioned by this client.
    _, csr9 = make_csr(tmp_path, "k9")
    c.publish({"serial": "SN-ACL-9", "csr": csr9, "model": "m", "firmware": "f"},
              topic="fleet/provisioning/prov-SN-ACL-9/request")

    # Barriers: the device's own measurement is answered, and SN-ACL-9 can
    # still be claimed by its rightful client.
    mine = unique_id("barrier")
    reply, _ = dev.measure(make_measurement(mine), timeout=10)
    assert reply.json().get("status") == "ok", reply.json()
    kind, d9 = request(prov, devices, "open-tpl", "SN-ACL-9", csr9)
    assert kind == "accepted", f"SN-ACL-9 was already claimed through a forged request: {d9}"

    stray = dev.messages_matching(lambda m: m.json().get("id") == forged, since)
    assert not stray, f"claim client's telemetry was answered: {stray}"
    assert prov.count_measurements(dev_id, forged) == 0
    assert prov.query("SELECT count(*) FROM measurements WHERE measurement_id IN (?, ?)",
                      forged, own_ns)[0][0] == 0


@pytest.mark.parametrize("cid", ["it-open-sn-acl-1", "claim:open-tpl", "prov-", "prov-" + "a" * 65,
                                 "prov-bad serial", "fleetml-service"])
def test_claim_cert_needs_prov_client_id(prov, devices, cid):
    outcome = attempt(prov, devices, None, client_id=cid,
                      certfile=str(prov.data / "claims/open-tpl/claim.crt"),
                      keyfile=str(prov.data / "claims/open-tpl/claim.key"))
    assert refused(outcome), f"claim cert with client id {cid!r}: {outcome}"


def test_serial_must_match_client_id(prov, devices, tmp_path):
    _, csr = make_csr(tmp_path, "k")
    payload = {"serial": "SN-MISMATCH-B", "csr": csr, "model": "m", "firmware": "f"}
    kind, doc = request(prov, devices, "open-tpl", "SN-MISMATCH-A", payload=payload)
    assert kind == "rejected", f"a claim for another serial than the client id's: {doc}"
    print(doc)
    # Neither serial was used up.
    for s in ("SN-MISMATCH-A", "SN-MISMATCH-B"):
        kind, doc = request(prov, devices, "open-tpl", s, make_csr(tmp_path, s)[1])
        assert kind == "accepted", f"{s}: {doc}"


# --------------------------------------------------------------------------
# Rejections


def test_unknown_serial_rejected(prov, devices, tmp_path):
    _, csr = make_csr(tmp_path, "k")
    assert_rejected(*request(prov, devices, "list-tpl", "SN-NOT-LISTED", csr),
                    "serial_not_allowed")
    # Control: a listed serial of the same template is accepted.
    kind, doc = request(prov, devices, "list-tpl", "SN-OK-1", csr)
    assert kind == "accepted", doc
    assert doc["device_id"] == "list-tpl-sn-ok-1", doc


def test_hook_denies(prov, devices, tmp_path):
    _, csr = make_csr(tmp_path, "k")
    assert_rejected(*request(prov, devices, "hook-tpl", "SN-HOOK-1", csr), "hook_denied")


def _csr_ca(tmp):
    return make_csr(tmp, "ca", ca=True)[1]


def _csr_rsa1024(tmp):
    return make_csr(tmp, "rsa1024", key="rsa1024")[1]


def _csr_k1(tmp):
    return make_csr(tmp, "k1", key="secp256k1")[1]


def _csr_badsig(tmp):
    return corrupt_csr_signature(tmp, make_csr(tmp, "bs")[1])


def _csr_garbage(tmp):
    return "-----BEGIN CERTIFICATE REQUEST-----\nTm90IGEgQ1NS\n-----END CERTIFICATE REQUEST-----\n"


CSR_CASES = [
    ("ca-extension", _csr_ca, "ca_not_allowed"),
    ("rsa1024", _csr_rsa1024, "weak_key"),
    ("secp256k1", _csr_k1, "weak_key"),
    ("bad-signature", _csr_badsig, "bad_signature"),
    ("garbage", _csr_garbage, "invalid_csr"),
]


@pytest.mark.parametrize("name,build,code", CSR_CASES, ids=[c[0] for c in CSR_CASES])
def test_bad_csr_rejected(prov, devices, tmp_path, name, build, code):
    serial = f"SN-CSR-{name}"
    assert_rejected(*request(prov, devices, "open-tpl", serial, build(tmp_path)), code)
    # The refused request registered nothing: the serial can still be claimed.
    kind, doc = request(prov, devices, "open-tpl", serial, make_csr(tmp_path, "good")[1])
    assert kind == "accepted", f"after a refused CSR: {doc}"


INVALID_REQUESTS = [
    ("not-json", lambda s, csr: b"this is not json"),
    ("not-object", lambda s, csr: b"[1,2,3]"),
    ("no-csr", lambda s, csr: {"serial": s, "model": "m", "firmware": "f"}),
    ("csr-number", lambda s, csr: {"serial": s, "csr": 5, "model": "m", "firmware": "f"}),
    ("no-serial", lambda s, csr: {"csr": csr, "model": "m", "firmware": "f"}),
]


@pytest.mark.parametrize("name,build", INVALID_REQUESTS, ids=[c[0] for c in INVALID_REQUESTS])
def test_invalid_request(prov, devices, tmp_path, name, build):
    serial = f"SN-INV-{name}"
    _, csr = make_csr(tmp_path, "k")
    assert_rejected(*request(prov, devices, "open-tpl", serial, payload=build(serial, csr)),
                    "invalid_request")


def test_same_serial_twice_refused(prov, devices, tmp_path):
    doc, keyfile, cert, ca = provision(prov, devices, tmp_path, "open-tpl", "SN-DUP-1")
    _, csr2 = make_csr(tmp_path, "second")
    assert_rejected(*request(prov, devices, "open-tpl", "SN-DUP-1", csr2), "already_provisioned")
    # The first identity is untouched.
    connect_as(prov, devices, doc["device_id"], cert, keyfile, ca)


def test_reprovision_revokes_old_cert(prov, devices, tmp_path):
    first, key1, cert1, ca = provision(prov, devices, tmp_path, "reprov-tpl", "SN-RE-1")
    dev_id = first["device_id"]
    old = connect_as(prov, devices, dev_id, cert1, key1, ca)
    mid = unique_id("re")
    assert old.measure(make_measurement(mid), timeout=10)[0].json()["status"] == "ok"

    second, key2, cert2, _ = provision(prov, devices, tmp_path, "reprov-tpl", "SN-RE-1")
    assert second["device_id"] == dev_id, "re-provisioning must keep the device id"
    assert cert_info(cert2)[0] != cert_info(cert1)[0]

    # The live session on the old certificate is cut, and it cannot come back.
    old.wait_lost(timeout=3)
    wait_for(lambda: refused(attempt(prov, devices, dev_id, certfile=cert1, keyfile=key1,
                                     ca_certs=ca)),
             3, interval=0.1, msg="old certificate refused after re-provisioning")
    new = connect_as(prov, devices, dev_id, cert2, key2, ca)
    mid = unique_id("re2")
    assert new.measure(make_measurement(mid), timeout=10)[0].json()["status"] == "ok"


def test_rate_limited(prov, devices, tmp_path):
    # Template rate 1 per minute: the bucket holds at most one token.
    results = []
    for i in range(4):
        _, csr = make_csr(tmp_path, f"k{i}")
        results.append(request(prov, devices, "slow-tpl", f"SN-RATE-{i}", csr))
    print([(k, d.get("code", d.get("device_id"))) for k, d in results])
    assert results[0][0] == "accepted", results[0]
    codes = [doc.get("code") for kind, doc in results[1:] if kind == "rejected"]
    assert "rate_limited" in codes, f"4 claims in a row at 1/min: {results}"
    assert set(codes) == {"rate_limited"}, results


def test_disabled_template_refused(prov, devices, tmp_path):
    live = claim_client(prov, devices, "off-tpl", "SN-OFF-LIVE").connect()
    prov.cli("template", "disable", "off-tpl")
    # Connected claim clients of the template are cut, new ones refused.
    live.wait_lost(timeout=3)
    wait_for(lambda: refused(attempt(prov, devices, None, client_id="prov-SN-OFF-1",
                                     certfile=str(prov.data / "claims/off-tpl/claim.crt"),
                                     keyfile=str(prov.data / "claims/off-tpl/claim.key"))),
             3, interval=0.1, msg="claim cert of a disabled template refused")


def test_lost_answer_retry_gets_same_certificate(prov, devices, tmp_path):
    # A device whose `accepted` was lost asks again with the same key: it
    # gets the same identity, not already_provisioned (docs/protocol.md).
    keyfile, csr = make_csr(tmp_path, "k")
    kind1, first = request(prov, devices, "open-tpl", "SN-RETRY-1", csr)
    kind2, again = request(prov, devices, "open-tpl", "SN-RETRY-1", csr)
    assert kind1 == "accepted" and kind2 == "accepted", (first, again)
    assert again["device_id"] == first["device_id"]
    assert cert_info(again["certificate_pem"]) == cert_info(first["certificate_pem"])


def test_one_key_one_device(prov, devices, tmp_path):
    # A second serial presenting a key another device holds is refused
    # (key_reused): a cloned device or a copied key gets no second identity.
    keyfile, csr = make_csr(tmp_path, "shared")
    kind, first = request(prov, devices, "open-tpl", "SN-KEY-1", csr)
    assert kind == "accepted", first
    kind, doc = request(prov, devices, "open-tpl", "SN-KEY-2", csr)
    assert_rejected(kind, doc, "key_reused")
    # Nothing was registered for the second serial.
    assert prov.query("SELECT COUNT(*) FROM devices WHERE serial_number = ?", "SN-KEY-2") == \
        [(0,)]
    # The first device asking again with its own key still gets its identity.
    kind, again = request(prov, devices, "open-tpl", "SN-KEY-1", csr)
    assert kind == "accepted" and again["device_id"] == first["device_id"], again


# --------------------------------------------------------------------------
# The published contract (no platform needed)

ISSUE3_SCHEMAS = [
    "provisioning-request.v1.json", "provisioning-accepted.v1.json",
    "provisioning-rejected.v1.json", "cert-rotate-request.v1.json",
    "cert-rotate-accepted.v1.json", "cert-rotate-rejected.v1.json", "shadow-update.v1.json",
    "shadow-document.v1.json", "shadow-delta.v1.json", "shadow-rejected.v1.json",
]
SPEC_PROVISIONING_CODES = {
    "invalid_request", "invalid_csr", "bad_signature", "weak_key", "ca_not_allowed",
    "serial_not_allowed", "hook_denied", "already_provisioned", "rate_limited",
    "template_disabled", "unavailable", "internal",
}


def test_protocol_doc_covers_identity_schemas():
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    with open(os.path.join(root, "docs", "protocol.md"), encoding="utf-8") as f:
        doc = f.read()
    for name in ISSUE3_SCHEMAS:
        with open(os.path.join(root, "docs", "schemas", name), encoding="utf-8") as f:
            schema = json.load(f)
        assert f"schemas/{name}" in doc, f"protocol.md does not link {name}"
        assert schema.get("examples"), f"{name} has no examples"
        for ex in schema["examples"]:
            check_against_schema(name, ex)
        codes = schema.get("properties", {}).get("code", {}).get("enum", [])
        for code in codes:
            assert f"`{code}`" in doc, f"protocol.md does not document {code} ({name})"
    with open(os.path.join(root, "docs", "schemas", "provisioning-rejected.v1.json")) as f:
        enum = set(json.load(f)["properties"]["code"]["enum"])
    assert SPEC_PROVISIONING_CODES <= enum, SPEC_PROVISIONING_CODES - enum
