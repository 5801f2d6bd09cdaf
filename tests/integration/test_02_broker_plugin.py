"""Black-box tests of the broker plugin (src/broker/plugin_auth.c).

A private mosquitto is started on free loopback ports with the built
fleetml_auth.so and a throwaway PKI made with the `openssl` CLI, so these
tests depend neither on the fleetml binary nor on fleetml's own PKI code.

The broker has two TLS listeners:

* `main`: the configuration the fleetml generator must emit (no
  use_identity_as_username), where MOSQ_EVT_BASIC_AUTH runs for every
  CONNECT and refuses a client id that differs from the certificate CN.
* `identity`: the same with use_identity_as_username true. Mosquitto 2.0.11
  skips BASIC_AUTH there, so the test checks the ACL fallback: an impostor
  may complete CONNECT but can neither publish, subscribe nor receive.

Negative delivery checks never sleep: a forbidden message is sent first and
an allowed marker after it on the same path, so once the marker has arrived
the forbidden message would have arrived before it had it been delivered.
"""

import os
import queue
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

SERVICE_ID = "fleetml-service"
TIMEOUT = 10.0

# MQTT reason codes as paho reports them.
CONNACK_V311_NOT_AUTHORIZED = 5
CONNACK_V5_NOT_AUTHORIZED = 135
SUBACK_V311_FAILURE = 0x80
SUBACK_V5_NOT_AUTHORIZED = 0x87


# --------------------------------------------------------------------------
# Throwaway PKI (openssl CLI)


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _make_pki(d: Path):
    """Creates ca, a server cert for 127.0.0.1 and client certs named by CN.
    Returns a dict name -> (cert, key)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=plugin-test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    (d / "ext.cnf").write_text(
        "[server]\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "[client]\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=clientAuth\n")

    def leaf(name, cn, section):
        _openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-set_serial", str(int.from_bytes(os.urandom(16), "big")),
                 "-days", "2", "-sha256", "-extfile", "ext.cnf", "-extensions", section,
                 "-out", f"{name}.crt", cwd=d)
        return (str(d / f"{name}.crt"), str(d / f"{name}.key"))

    certs = {"ca": (str(d / "ca.crt"), str(d / "ca.key"))}
    certs["server"] = leaf("server", "localhost", "server")
    for cn in ("dev-001", "dev-002", SERVICE_ID, "Bad_CN"):
        certs[cn] = leaf(cn.lower().replace("_", "-"), cn, "client")
    return certs


# --------------------------------------------------------------------------
# Broker


def _free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_for(pred, timeout=TIMEOUT, msg="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {msg}")
        time.sleep(0.02)


def _port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Broker:
    def __init__(self, workdir: Path, plugin: str, certs):
        self.workdir = workdir
        self.certs = certs
        self.ports = {}
        self.proc = None
        self.log_path = workdir / "mosquitto.log"
        self.plugin = plugin

    def _conf(self):
        ca, (crt, key) = self.certs["ca"][0], self.certs["server"]
        lines = [
            # Mosquitto drops privileges to user `mosquitto` when started as
            # root, which could not read this temp dir; test config only.
            *(["user root"] if os.geteuid() == 0 else []),
            "per_listener_settings false",
            "allow_anonymous false",
            "persistence false",
            "log_dest stderr",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            f"plugin {self.plugin}",
            f"plugin_opt_service_id {SERVICE_ID}",
        ]
        for name, extra in (("main", []), ("identity", ["use_identity_as_username true"])):
            lines += [f"listener {self.ports[name]} 127.0.0.1",
                      f"cafile {ca}", f"certfile {crt}", f"keyfile {key}",
                      "require_certificate true", "tls_version tlsv1.2", *extra]
        return "\n".join(lines) + "\n"

    def start(self, binary):
        # A port picked as free can be taken before mosquitto binds it; retry
        # with fresh ports instead of failing the whole module on that race.
        for _ in range(3):
            self.ports = dict(zip(("main", "identity"), _free_ports(2)))
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(self._conf())
            log = open(self.log_path, "wb")
            self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.workdir)
            log.close()
            try:
                _wait_for(lambda: self.proc.poll() is not None
                          or all(_port_open(p) for p in self.ports.values()),
                          msg="mosquitto listeners")
            except AssertionError:
                self.stop()
                raise AssertionError("mosquitto did not open its ports:\n" + self.log())
            if self.proc.poll() is None:
                return
            self.proc = None
        raise AssertionError("mosquitto failed to start:\n" + self.log())

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    build = os.environ.get("FM_BUILD")
    if not build:
        pytest.skip("FM_BUILD (CMake build dir with fleetml_auth.so) is not set")
    plugin = os.path.join(os.path.abspath(build), "fleetml_auth.so")
    if not os.path.isfile(plugin):
        pytest.fail(f"plugin not built: {plugin}", pytrace=False)
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(binary, os.X_OK):
        pytest.skip("mosquitto is not installed")
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI is not installed")

    d = tmp_path_factory.mktemp("broker_plugin")
    b = Broker(d, plugin, _make_pki(d))
    try:
        b.start(binary)
        yield b
    finally:
        b.stop()


# --------------------------------------------------------------------------
# MQTT clients


class Client:
    """A paho client with its network loop in a thread, recording CONNACK,
    SUBACK and received messages for condition-based waiting."""

    def __init__(self, broker, cert_cn, client_id, listener="main",
                 protocol=mqtt.MQTTv311, username=None):
        self.broker = broker
        self.port = broker.ports[listener]
        self.v5 = protocol == mqtt.MQTTv5
        self.connack = None
        self.closed = threading.Event()
        self.connected = threading.Event()
        self.messages = queue.Queue()
        self.subacks = {}
        self._lock = threading.Lock()
        kw = {} if self.v5 else {"clean_session": True}
        self.c = mqtt.Client(client_id=client_id, protocol=protocol, **kw)
        crt, key = broker.certs[cert_cn]
        # Verifies the broker (CA + IP SAN 127.0.0.1) like a real device.
        ctx = ssl.create_default_context(cafile=broker.certs["ca"][0])
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(crt, key)
        self.c.tls_set_context(ctx)
        if username:
            self.c.username_pw_set(username)
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))

    def _on_connect(self, client, userdata, flags, rc, properties=None):
        self.connack = int(rc.value) if hasattr(rc, "value") else int(rc)
        if self.connack == 0:
            self.connected.set()
        else:
            self.closed.set()

    def _on_disconnect(self, client, userdata, rc, properties=None):
        self.closed.set()

    def _on_subscribe(self, client, userdata, mid, granted, properties=None):
        codes = [int(g.value) if hasattr(g, "value") else int(g) for g in granted]
        with self._lock:
            self.subacks[mid] = codes

    def connect(self):
        """Connects and returns the CONNACK code (None if the broker closed
        the connection without one)."""
        self.c.connect("127.0.0.1", self.port, keepalive=30)
        self.c.loop_start()
        _wait_for(lambda: self.connected.is_set() or self.closed.is_set(), msg="CONNACK")
        return self.connack

    def subscribe(self, *filters, qos=1):
        rc, mid = self.c.subscribe([(f, qos) for f in filters])
        assert rc == mqtt.MQTT_ERR_SUCCESS
        return _wait_for(lambda: self.subacks.get(mid), msg=f"SUBACK for {filters}")

    def publish(self, topic, payload, qos=1):
        """Publishes with QoS 1 and waits for the PUBACK: mosquitto routes the
        message to subscribers before it acknowledges it, so afterwards the
        message is already queued (or dropped) for every receiver."""
        info = self.c.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout=TIMEOUT)
        assert info.is_published(), f"no PUBACK for {topic}"

    def expect(self, topic, payload, timeout=TIMEOUT):
        """Waits for (topic, payload) and returns every message received
        before it, in order."""
        before = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{topic} {payload!r} not received; got {before}")
            try:
                m = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if m == (topic, payload):
                return before
            before.append(m)

    def close(self):
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()


@pytest.fixture
def clients(broker):
    made = []

    def make(cert_cn, client_id, **kw):
        c = Client(broker, cert_cn, client_id, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def _connected(clients, cert_cn, client_id=None, **kw):
    c = clients(cert_cn, client_id if client_id is not None else cert_cn, **kw)
    assert c.connect() == 0, f"{client_id or cert_cn} was refused"
    return c


# --------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["v311", "v5"])
def test_matching_client_id_connects(clients, protocol):
    assert clients("dev-001", "dev-001", protocol=protocol).connect() == 0
    assert clients(SERVICE_ID, SERVICE_ID, protocol=protocol).connect() == 0


@pytest.mark.parametrize("cert_cn,client_id,username", [
    ("dev-001", "dev-002", None),        # someone else's id
    ("dev-001", "dev-002", "dev-002"),   # a username changes nothing
    ("dev-001", "dev-001x", None),       # prefix match is not a match
    ("dev-001", SERVICE_ID, None),       # a device cannot become the service
    ("dev-001", "", None),               # broker-assigned id
    ("Bad_CN", "Bad_CN", None),          # CN is not a valid device id
])
def test_mismatched_identity_refused(clients, broker, cert_cn, client_id, username):
    c = clients(cert_cn, client_id, username=username)
    assert c.connect() == CONNACK_V311_NOT_AUTHORIZED, broker.log()[-2000:]


def test_mismatched_identity_refused_v5(clients):
    c = clients("dev-001", "dev-002", protocol=mqtt.MQTTv5)
    assert c.connect() == CONNACK_V5_NOT_AUTHORIZED


def test_device_publishes_only_under_own_id(clients):
    svc = _connected(clients, SERVICE_ID)
    assert svc.subscribe("$share/fleetml/fleet/+/measurements", "fleet/#") == [1, 1]
    dev = _connected(clients, "dev-001")

    for forbidden in ("fleet/dev-002/measurements", "fleet/dev-001", "fleet/dev-0011/x",
                      "other/dev-001/measurements"):
        dev.publish(forbidden, b"forbidden")
    dev.publish("fleet/dev-001/measurements", b"ok")
    # Two subscriptions match, so the allowed message may arrive twice; the
    # forbidden ones would have arrived before it.
    early = svc.expect("fleet/dev-001/measurements", b"ok")
    assert all(m == ("fleet/dev-001/measurements", b"ok") for m in early), early


def test_device_receives_only_own_topics(clients):
    dev1 = _connected(clients, "dev-001")
    dev2 = _connected(clients, "dev-002")
    svc = _connected(clients, SERVICE_ID)
    assert dev1.subscribe("fleet/dev-001/#") == [1]
    assert dev2.subscribe("fleet/dev-002/results") == [1]

    # dev-001 cannot inject into dev-002's topics...
    dev1.publish("fleet/dev-002/results", b"spoofed")
    # ...the parent level matches `fleet/dev-001/#` but is not under the
    # device, so the READ check must drop it...
    svc.publish("fleet/dev-001", b"parent-level")
    # ...and the service reaches each device on its own topics.
    svc.publish("fleet/dev-002/results", b"for-dev-002")
    svc.publish("fleet/dev-001/results", b"for-dev-001")
    assert dev2.expect("fleet/dev-002/results", b"for-dev-002") == []
    assert dev1.expect("fleet/dev-001/results", b"for-dev-001") == []


@pytest.mark.parametrize("protocol,refused", [
    (mqtt.MQTTv311, SUBACK_V311_FAILURE), (mqtt.MQTTv5, SUBACK_V5_NOT_AUTHORIZED)],
    ids=["v311", "v5"])
def test_device_subscriptions_restricted(clients, protocol, refused):
    dev = _connected(clients, "dev-001", protocol=protocol)
    bad = ["fleet/+/results", "fleet/#", "#", "+/dev-001/results",
           "$share/fleetml/fleet/+/measurements", "$share/g/fleet/dev-001/results",
           "fleet/dev-002/results", "fleet/dev-001", "$SYS/#"]
    assert dev.subscribe(*bad) == [refused] * len(bad)
    good = ["fleet/dev-001/results", "fleet/dev-001/#", "fleet/dev-001/+/x"]
    assert dev.subscribe(*good) == [1] * len(good)


def test_service_may_subscribe_anything(clients):
    svc = _connected(clients, SERVICE_ID)
    assert svc.subscribe("#", "fleet/+/results", "$share/fleetml/fleet/+/measurements") == [1, 1, 1]


def test_identity_listener_falls_back_to_acl(clients):
    """With use_identity_as_username, mosquitto 2.0.11 does not call
    BASIC_AUTH, so an impostor may complete CONNECT; the ACL check must then
    refuse it everything. If a future mosquitto refuses the CONNECT instead,
    that is stronger and also accepted."""
    svc = _connected(clients, SERVICE_ID, listener="identity")
    assert svc.subscribe("fleet/#") == [1]
    imp = clients("dev-001", "dev-002", listener="identity")
    rc = imp.connect()
    if rc != 0:
        assert rc == CONNACK_V311_NOT_AUTHORIZED
        return
    assert imp.subscribe("fleet/dev-002/results", "fleet/dev-001/results") == [0x80, 0x80]
    imp.publish("fleet/dev-002/measurements", b"impostor")
    imp.publish("fleet/dev-001/measurements", b"impostor")
    honest = _connected(clients, "dev-001", listener="identity")
    honest.publish("fleet/dev-001/measurements", b"honest")
    assert svc.expect("fleet/dev-001/measurements", b"honest") == []
