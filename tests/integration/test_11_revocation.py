"""Revocation, disable and enable of device identities (issue 3).

`fleetml device revoke|disable|enable` change the database; the running
`serve` notices (registry_events, polled every 200 ms) and tells the broker
plugin, which refuses new connections and cuts live ones.  A revoke must cut
a live session within 1 s of the command returning.  Revocation is final
and is published in the CRL <data>/pki/crl.pem.
"""

import re
import subprocess
import time

import pytest

from helpers import cert_info, make_measurement, unique_id, wait_for

DEVICES = ["rev-connect", "rev-live", "rev-toggle", "rev-final", "rev-barrier", "rev-crl",
           "rev-crl-keep"]


@pytest.fixture(scope="module")
def plat(module_platform):
    return module_platform("rev", devices=DEVICES)


def attempt(p, devices, device_id, **kw):
    d = devices(p, device_id, **kw)
    try:
        return d.try_connect(timeout=5)
    finally:
        d.close()


def refused(outcome):
    return outcome not in ("connected", "timeout")


# Generous bounds: CI is a busy 2-core machine. The figures are printed; the
# target (a revoke cuts a live session within 1 s) is what they are read
# against, not what a test waits for.
BOUND_S = 5.0


def wait_refused(p, devices, device_id, timeout=10.0, what=""):
    t0 = time.monotonic()
    last = []

    def check():
        o = attempt(p, devices, device_id)
        last[:] = [o]
        return refused(o)
    try:
        wait_for(check, timeout, interval=0.05, msg=f"{device_id} refused at connect {what}")
    except AssertionError as e:
        raise AssertionError(f"{e}; last outcome: {last}\n{p.log_tail(30)}") from None
    print(f"{device_id} refused {time.monotonic() - t0:.3f}s after the command: {last[0]}")
    return last[0]


def live(p, devices, device_id):
    d = devices(p, device_id).connect()
    assert all(c < 0x80 for c in d.subscribe(d.results_topic))
    mid = unique_id("live")
    r = d.measure(make_measurement(mid), timeout=10)[0].json()
    assert r.get("status") == "ok", r
    return d


def crl_serials(p):
    r = subprocess.run(["openssl", "crl", "-in", str(p.data / "pki" / "crl.pem"), "-noout",
                        "-text"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"crl.pem unreadable: {r.stderr}"
    return {int(s, 16) for s in re.findall(r"Serial Number:\s*([0-9A-Fa-f]+)", r.stdout)}


def test_revoked_device_refused_at_connect(plat, devices):
    # Control: the device connects before it is revoked.
    assert attempt(plat, devices, "rev-connect") == "connected"
    plat.cli("device", "revoke", "rev-connect")
    wait_refused(plat, devices, "rev-connect", what="after revoke")
    # And it stays refused.
    assert refused(attempt(plat, devices, "rev-connect"))


def test_revoke_cuts_live_session_within_1s(plat, devices):
    d = live(plat, devices, "rev-live")
    n = len(d.lost_times)
    t0 = time.monotonic()
    plat.cli("device", "revoke", "rev-live")
    t_end = time.monotonic()
    lost = d.wait_lost(timeout=10, after=n)
    print(f"revoke command took {t_end - t0:.3f}s; session cut {lost - t_end:+.3f}s after "
          f"it returned (disconnect reason {d.disconnects[-1:]})")
    assert lost - t_end < BOUND_S, f"live session cut {lost - t_end:.3f}s after revoke returned"
    wait_refused(plat, devices, "rev-live", what="after revoke")


def test_disable_enable_reversible(plat, devices):
    d = live(plat, devices, "rev-toggle")
    plat.cli("device", "disable", "rev-toggle")
    t_end = time.monotonic()
    lost = d.wait_lost(timeout=10)
    print(f"disabled device's session cut {lost - t_end:+.3f}s after the command returned")
    assert lost - t_end < BOUND_S, f"disabled device's session cut only after {lost - t_end:.3f}s"
    wait_refused(plat, devices, "rev-toggle", what="after disable")

    plat.cli("device", "enable", "rev-toggle")
    wait_for(lambda: attempt(plat, devices, "rev-toggle") == "connected", 3, interval=0.05,
             msg="rev-toggle accepted again after enable")
    live(plat, devices, "rev-toggle")


def test_revoke_is_final(plat, devices):
    assert attempt(plat, devices, "rev-final") == "connected"
    plat.cli("device", "revoke", "rev-final")
    wait_refused(plat, devices, "rev-final", what="after revoke")

    r = plat.cli("device", "enable", "rev-final", check=False)
    print(f"enable after revoke: exit {r.returncode}: {r.stdout.strip()} {r.stderr.strip()}")

    # Barrier: a later registry change (disabling another device) has taken
    # effect, so the enable above has been processed too, whatever it did.
    assert attempt(plat, devices, "rev-barrier") == "connected"
    plat.cli("device", "disable", "rev-barrier")
    wait_refused(plat, devices, "rev-barrier", what="(barrier)")
    outcome = attempt(plat, devices, "rev-final")
    assert refused(outcome), (
        f"revoked device accepted after `device enable` (exit {r.returncode}): {outcome}")


def test_crl_lists_revoked_serial(plat, devices):
    revoked, _ = cert_info(plat.device_dir("rev-crl") / "device.crt")
    kept, _ = cert_info(plat.device_dir("rev-crl-keep") / "device.crt")
    plat.cli("device", "disable", "rev-crl-keep")
    plat.cli("device", "revoke", "rev-crl")
    crl = plat.data / "pki" / "crl.pem"
    serials = wait_for(lambda: crl.exists() and revoked in crl_serials(plat) and crl_serials(plat),
                       5, interval=0.05, msg=f"serial {revoked:x} in {crl}")
    assert kept not in serials, "a merely disabled device's certificate is in the CRL"
    r = subprocess.run(["openssl", "crl", "-in", str(crl), "-CAfile", plat.ca_cert, "-noout"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "verify OK" in (r.stdout + r.stderr), (
        f"CRL not signed by the node's CA: {r.stdout} {r.stderr}")


def test_revoke_unknown_device_fails(plat):
    r = plat.cli("device", "revoke", "no-such-device", check=False)
    assert r.returncode != 0, f"revoking an unknown device succeeded: {r.stdout}"
