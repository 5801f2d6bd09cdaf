"""Who may connect, publish and subscribe (issue acceptance items 3 and 4).

Each device may only use its own topics under fleet/<id>/, and only with a
certificate issued by the platform CA whose CN equals the client id."""

import pytest

from helpers import make_foreign_client_cert, make_measurement, unique_id

DENIED = 0x80


def assert_cannot_connect(dev, what):
    outcome = dev.try_connect(timeout=5)
    assert outcome != "connected", f"{what}: connection was accepted"
    assert outcome != "timeout", (
        f"{what}: neither accepted nor refused within 5 s (expected a TLS failure, "
        f"a refusing CONNACK or the connection being closed)")
    return outcome


def test_publish_to_other_device_topic_refused(platform, connected):
    a = connected(platform, "dev-a")
    b = connected(platform, "dev-b")
    forged = unique_id("forged")
    since_b = b.mark()
    a.publish(make_measurement(forged), topic=f"fleet/{b.device_id}/measurements")
    # A response topic in another device's namespace must not be honoured
    # either: the service would otherwise publish on A's behalf.
    redirected = unique_id("redirect")
    a.publish(make_measurement(redirected), response_topic=b.results_topic,
              correlation=b"x")

    # Barrier: a measurement of B's own, sent after the forged one, is
    # answered; anything the forged publish caused would be there by now.
    own = unique_id("own")
    reply, _ = b.measure(make_measurement(own))
    assert reply.json()["status"] == "ok"
    bad = b.messages_matching(lambda m: m.json().get("id") in (forged, redirected), since_b)
    assert not bad, f"B received replies caused by A: {bad}"
    assert platform.count_measurements(b.device_id, forged) == 0
    assert platform.count_measurements(a.device_id, forged) == 0
    assert platform.count_measurements(b.device_id) == 1


@pytest.mark.parametrize("topic", ["fleet/+/results", "fleet/dev-b/results", "fleet/#", "#",
                                   "fleet/dev-b/measurements"])
def test_subscribe_to_other_devices_refused(platform, connected, topic):
    a = connected(platform, "dev-c")
    codes = a.subscribe(topic, keep=False)
    assert len(codes) == 1 and codes[0] >= DENIED, (
        f"SUBACK for {topic} was {[hex(c) for c in codes]}, expected a failure (>= 0x80)")


def test_client_id_must_equal_cn(platform, devices):
    # A's certificate with B's client id (impersonation) and with an
    # unregistered client id.
    for cid in ("dev-b", "someone-else"):
        dev = devices(platform, "dev-impostor", client_id=cid)
        outcome = assert_cannot_connect(dev, f"client id {cid} with CN dev-impostor")
        dev.close()
        print(f"client id {cid}: {outcome}")
    # Control: the same certificate with the right client id works.
    ok = devices(platform, "dev-impostor").connect()
    assert ok.connacks[-1] < DENIED


def test_no_client_certificate_refused(platform, devices):
    dev = devices(platform, "dev-nocert", certfile="", keyfile="")
    print(assert_cannot_connect(dev, "no client certificate"))


def test_foreign_ca_certificate_refused(platform, devices, tmp_path):
    # Same CN as a registered device, but signed by a CA of our own.
    cert, key = make_foreign_client_cert(tmp_path / "rogue", "dev-rogue")
    dev = devices(platform, "dev-rogue", certfile=cert, keyfile=key)
    print(assert_cannot_connect(dev, "certificate from a foreign CA"))
    # Control: the genuine certificate for that CN is accepted.
    devices(platform, "dev-rogue").connect()
