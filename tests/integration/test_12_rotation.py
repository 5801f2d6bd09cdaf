"""Certificate rotation (issue 3): a connected device sends a new CSR to
fleet/<id>/cert/rotate and gets a new certificate on fleet/<id>/cert/accepted.
The old certificate keeps working for `pki.rotation_grace_s` (set to a few
seconds here), then is revoked: refused at connect, live sessions cut.
"""

import re
import subprocess
import time
from datetime import datetime

import pytest

from helpers import (cert_info, check_against_schema, make_csr, make_measurement, unique_id,
                     wait_for)

GRACE_S = 5
DENIED = 0x80


@pytest.fixture(scope="module")
def plat(module_platform):
    return module_platform("rot", devices=["rot-a", "rot-b", "rot-c"],
                           sets={"pki.rotation_grace_s": str(GRACE_S)})


def attempt(p, devices, device_id, **kw):
    d = devices(p, device_id, **kw)
    try:
        return d.try_connect(timeout=5)
    finally:
        d.close()


def refused(outcome):
    return outcome not in ("connected", "timeout")


def live(p, devices, device_id, **kw):
    d = devices(p, device_id, **kw).connect()
    assert all(c < DENIED for c in d.subscribe(d.results_topic))
    mid = unique_id("rot")
    r = d.measure(make_measurement(mid), timeout=10)[0].json()
    assert r.get("status") == "ok", r
    return d


def rotate(d, csr, timeout=10):
    """Publishes a rotation request; returns ("accepted"|"rejected", doc)."""
    base = f"fleet/{d.device_id}/cert"
    codes = d.subscribe(base + "/+")
    assert all(c < DENIED for c in codes), f"SUBACK {codes} for {base}/+"
    since = d.mark()
    d.publish({"csr": csr} if isinstance(csr, str) else csr, topic=base + "/rotate")
    m = d.wait_message(lambda m: m.topic in (base + "/accepted", base + "/rejected"),
                       timeout=timeout, since=since, what=f"rotation answer on {base}/+")
    kind, doc = m.topic.rsplit("/", 1)[1], m.json()
    check_against_schema(f"cert-rotate-{kind}.v1.json", doc)
    return kind, doc


def parse_rfc3339(s):
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", s), s
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def crl_serials(p):
    crl = p.data / "pki" / "crl.pem"
    if not crl.exists():
        return set()
    r = subprocess.run(["openssl", "crl", "-in", str(crl), "-noout", "-text"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return {int(s, 16) for s in re.findall(r"Serial Number:\s*([0-9A-Fa-f]+)", r.stdout)}


def test_rotation_and_grace_period(plat, devices, tmp_path):
    old_cert = str(plat.device_dir("rot-a") / "device.crt")
    old_key = str(plat.device_dir("rot-a") / "device.key")
    old_serial, _ = cert_info(old_cert)
    s1 = live(plat, devices, "rot-a")

    new_key, csr = make_csr(tmp_path, "new", cn="ignored-subject")
    kind, doc = rotate(s1, csr)
    t_acc = time.time()
    assert kind == "accepted", doc
    for k in ("certificate_pem", "ca_pem", "old_certificate_valid_until"):
        assert k in doc, f"cert/accepted lacks {k}: {doc}"
    new_serial, cn = cert_info(doc["certificate_pem"])
    assert cn == "rot-a", f"new certificate CN {cn!r}"
    assert new_serial != old_serial
    assert cert_info(doc["ca_pem"]) == cert_info(plat.ca_cert)
    valid_until = parse_rfc3339(doc["old_certificate_valid_until"])
    assert t_acc + GRACE_S - 3 <= valid_until <= t_acc + GRACE_S + 1, (
        f"old_certificate_valid_until {doc['old_certificate_valid_until']} is not "
        f"~{GRACE_S}s (pki.rotation_grace_s) from now")
    new_cert = tmp_path / "new.crt"
    new_cert.write_text(doc["certificate_pem"])

    # The new certificate works (this session takes over the old one).
    s2 = live(plat, devices, "rot-a", certfile=str(new_cert), keyfile=new_key)
    s2.close()

    # During the grace period the old certificate still works.
    s3 = live(plat, devices, "rot-a", certfile=old_cert, keyfile=old_key)
    assert time.time() < valid_until, (
        "the test was too slow to use the old certificate inside the grace period")
    n = len(s3.lost_times)

    # After it, the live session on the old certificate is cut ...
    lost = s3.wait_lost(timeout=max(0.0, valid_until - time.time()) + 5, after=n)
    lost_wall = time.time() - (time.monotonic() - lost)
    print(f"old-certificate session cut {lost_wall - valid_until:+.3f}s after valid_until")
    assert lost_wall >= valid_until - 0.5, (
        f"old certificate cut {valid_until - lost_wall:.3f}s before its grace period ended")

    # ... it is refused at connect, and listed in the CRL ...
    wait_for(lambda: refused(attempt(plat, devices, "rot-a", certfile=old_cert,
                                     keyfile=old_key)),
             3, interval=0.05, msg="old certificate refused after the grace period")
    wait_for(lambda: old_serial in crl_serials(plat), 3, interval=0.05,
             msg="old certificate's serial in crl.pem")
    assert new_serial not in crl_serials(plat)
    # ... while the new one keeps working.
    live(plat, devices, "rot-a", certfile=str(new_cert), keyfile=new_key)


def test_rotation_rejects_bad_csr(plat, devices, tmp_path):
    d = live(plat, devices, "rot-b")
    _, weak = make_csr(tmp_path, "weak", key="rsa1024")
    kind, doc = rotate(d, weak)
    assert kind == "rejected" and doc.get("code") == "weak_key", doc
    assert isinstance(doc.get("message"), str) and doc["message"], doc
    _, ca = make_csr(tmp_path, "ca", ca=True)
    kind, doc = rotate(d, ca)
    assert kind == "rejected" and doc.get("code") == "ca_not_allowed", doc
    kind, doc = rotate(d, {"certificate": "nope"})
    assert kind == "rejected" and doc.get("code") == "invalid_request", doc
    # The current certificate is unaffected.
    mid = unique_id("after-reject")
    assert d.measure(make_measurement(mid), timeout=10)[0].json()["status"] == "ok"


def test_new_cert_client_id_must_equal_cn(plat, devices, tmp_path):
    d = live(plat, devices, "rot-c")
    new_key, csr = make_csr(tmp_path, "new", cn="rot-a")
    kind, doc = rotate(d, csr)
    assert kind == "accepted", doc
    d.close()
    new_cert = tmp_path / "new.crt"
    new_cert.write_text(doc["certificate_pem"])
    for cid in ("rot-a", "rot-b", "rot-c-2", "prov-rot-c"):
        outcome = attempt(plat, devices, "rot-c", client_id=cid, certfile=str(new_cert),
                          keyfile=new_key)
        assert refused(outcome), f"new rot-c certificate with client id {cid}: {outcome}"
    # Control: with the right client id it connects.
    live(plat, devices, "rot-c", certfile=str(new_cert), keyfile=new_key)
