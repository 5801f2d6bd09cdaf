"""Black-box tests of the broker plugin (src/broker/plugin_auth.c).

A private mosquitto is started on free loopback ports with the built
fleetml_auth.so, a throwaway PKI made with the `openssl` CLI and a registry
snapshot written by the test, so these tests depend neither on the fleetml
binary nor on fleetml's own PKI code.

The broker has two TLS listeners:

* `main`: the configuration the fleetml generator must emit (no
  use_identity_as_username), where MOSQ_EVT_BASIC_AUTH runs for every
  CONNECT and checks the certificate against the client id and the registry.
* `socket`: a Unix socket named by plugin_opt_service_socket, the service's
  transport in supervised mode: no TLS, and the plugin admits only a
  service client id there.
* `identity`: the same with use_identity_as_username true. Mosquitto 2.0.11
  skips BASIC_AUTH there, so the test checks the ACL fallback: without the
  connection record BASIC_AUTH creates, devices may complete CONNECT but can
  neither publish, subscribe nor receive.

Negative delivery checks never sleep: a forbidden message is sent first and
an allowed marker after it on the same path, so once the marker has arrived
the forbidden message would have arrived before it had it been delivered.
Control ops are answered on $CONTROL/fleetml/v1/response, which the tests use
to know when an op has been applied.
"""

import json
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
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SERVICE_ID = "fleetml-service"
TIMEOUT = 10.0
CONTROL = "$CONTROL/fleetml/v1"
RESPONSE = "$CONTROL/fleetml/v1/response"

# MQTT reason codes as paho reports them.
CONNACK_V311_NOT_AUTHORIZED = 5
CONNACK_V5_NOT_AUTHORIZED = 135
SUBACK_V311_FAILURE = 0x80
SUBACK_V5_NOT_AUTHORIZED = 0x87

# name -> certificate CN. Names are also the file stems.
CERTS = {
    "dev-001": "dev-001",
    "dev-001-rotated": "dev-001",    # second listed cert of dev-001
    "dev-001-unlisted": "dev-001",   # valid CA signature, serial not listed
    "dev-002": "dev-002",
    "dev-disabled": "dev-disabled",
    "dev-revoked": "dev-revoked",
    "dev-unknown": "dev-unknown",
    "dev-kick": "dev-kick",
    "dev-gone": "dev-gone",
    "dev-reload": "dev-reload",
    SERVICE_ID: SERVICE_ID,
    "bad-cn": "Bad_CN",
    "provisioning": "provisioning",  # reserved, never a device id
    "claim-a": "claim:tmpl-a",
    "claim-a-unlisted": "claim:tmpl-a",
    "claim-b": "claim:tmpl-b",       # template disabled
    "claim-kick": "claim:tmpl-k",
}


# --------------------------------------------------------------------------
# Throwaway PKI (openssl CLI)


def _openssl(*args, cwd):
    return subprocess.run(["openssl", *args], cwd=cwd, check=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True).stdout


def _bn2hex(n):
    """The spec's serial format: lowercase BN_bn2hex, i.e. whole bytes."""
    h = f"{n:x}"
    return h if len(h) % 2 == 0 else "0" + h


def _make_pki(d: Path):
    """Creates ca, a server cert for 127.0.0.1 and the client certs of CERTS.
    Returns (certs: name -> (cert, key), serials: name -> serial hex)."""
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
    serials = {}

    def leaf(name, cn, section):
        serial = int.from_bytes(os.urandom(16), "big") >> 1 or 1
        _openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-set_serial", str(serial),
                 "-days", "2", "-sha256", "-extfile", "ext.cnf", "-extensions", section,
                 "-out", f"{name}.crt", cwd=d)
        # Cross-check the expected format against what OpenSSL itself prints.
        printed = _openssl("x509", "-in", f"{name}.crt", "-noout", "-serial", cwd=d)
        assert printed.strip().split("=", 1)[1].lower() == _bn2hex(serial)
        serials[name] = _bn2hex(serial)
        return (str(d / f"{name}.crt"), str(d / f"{name}.key"))

    certs = {"ca": (str(d / "ca.crt"), str(d / "ca.key"))}
    certs["server"] = leaf("server", "localhost", "server")
    for name, cn in CERTS.items():
        certs[name] = leaf(name, cn, "client")
    return certs, serials


def _base_registry(serials):
    def dev(status, *names):
        return {"status": status, "certs": [serials[n] for n in names]}
    return {
        "format": 1,
        "devices": {
            "dev-001": dev("active", "dev-001", "dev-001-rotated"),
            "dev-002": dev("active", "dev-002"),
            "dev-disabled": dev("disabled", "dev-disabled"),
            "dev-revoked": dev("revoked", "dev-revoked"),
            "dev-kick": dev("active", "dev-kick"),
            "dev-gone": dev("active", "dev-gone"),
            # Never admitted, whatever the registry says: reserved name.
            "provisioning": dev("active", "provisioning"),
        },
        "templates": {
            "tmpl-a": {"status": "active", "claim_certs": [serials["claim-a"]]},
            "tmpl-b": {"status": "disabled", "claim_certs": [serials["claim-b"]]},
            "tmpl-k": {"status": "active", "claim_certs": [serials["claim-kick"]]},
        },
    }


def _write_atomic(path: Path, obj):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


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
    def __init__(self, workdir: Path, plugin: str, certs, serials, registry: Path):
        self.workdir = workdir
        self.certs = certs
        self.serials = serials
        self.registry = registry
        self.ports = {}
        self.proc = None
        self.log_path = workdir / "mosquitto.log"
        self.plugin = plugin
        self.socket = workdir / "service.sock"

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
            f"plugin_opt_registry {self.registry}",
            f"plugin_opt_service_socket {self.socket}",
        ]
        for name, extra in (("main", []), ("identity", ["use_identity_as_username true"])):
            lines += [f"listener {self.ports[name]} 127.0.0.1",
                      f"cafile {ca}", f"certfile {crt}", f"keyfile {key}",
                      "require_certificate true", "tls_version tlsv1.2", *extra]
        lines += [f"listener 0 {self.socket}"]
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
                          or (all(_port_open(p) for p in self.ports.values())
                              and self.socket.exists()),
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

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_since(self, mark):
        """Log text written after mark = len(self.log()) was taken."""
        return self.log()[mark:]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Plugin path, mosquitto binary and the PKI, shared by every broker."""
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
    d = tmp_path_factory.mktemp("broker_pki")
    certs, serials = _make_pki(d)
    return {"plugin": plugin, "binary": binary, "certs": certs, "serials": serials}


@pytest.fixture(scope="module")
def broker(env, tmp_path_factory):
    d = tmp_path_factory.mktemp("broker_plugin")
    registry = d / "registry.json"
    _write_atomic(registry, _base_registry(env["serials"]))
    b = Broker(d, env["plugin"], env["certs"], env["serials"], registry)
    try:
        b.start(env["binary"])
        yield b
        # Whatever the tests did, the plugin must not have crashed the broker.
        assert b.alive(), "mosquitto died:\n" + b.log()[-4000:]
    finally:
        b.stop()


# --------------------------------------------------------------------------
# MQTT clients


class _UnixClient(mqtt.Client):
    """paho 1.6 speaks TCP only; the same client over a Unix socket path."""

    def __init__(self, path, **kw):
        super().__init__(**kw)
        self._unix_path = str(path)

    def _create_socket_connection(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self._unix_path)
        return s


class Client:
    """A paho client with its network loop in a thread, recording CONNACK,
    SUBACK and received messages for condition-based waiting. On the
    `socket` listener it has no certificate (cert_name None)."""

    def __init__(self, broker, cert_name, client_id, listener="main",
                 protocol=mqtt.MQTTv311, username=None, clean=True, will=None):
        self.broker = broker
        # paho wants a port even where it is not used (the socket listener).
        self.port = broker.ports.get(listener, 1)
        self.v5 = protocol == mqtt.MQTTv5
        self.connack = None
        self.closed = threading.Event()
        self.closed_at = None
        self.connected = threading.Event()
        self.messages = queue.Queue()
        self.received = []  # (topic, payload, properties or None), every message
        self.subacks = {}
        self._lock = threading.Lock()
        kw = {} if self.v5 else {"clean_session": clean}
        self.clean = clean
        if listener == "socket":
            self.c = _UnixClient(broker.socket, client_id=client_id, protocol=protocol, **kw)
        else:
            self.c = mqtt.Client(client_id=client_id, protocol=protocol, **kw)
            crt, key = broker.certs[cert_name]
            # Verifies the broker (CA + IP SAN 127.0.0.1) like a real device.
            ctx = ssl.create_default_context(cafile=broker.certs["ca"][0])
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(crt, key)
            self.c.tls_set_context(ctx)
        if username:
            self.c.username_pw_set(username)
        if will:
            topic, payload, props = will
            self.c.will_set(topic, payload, qos=1, properties=props)
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, rc, properties=None):
        self.connack = int(rc.value) if hasattr(rc, "value") else int(rc)
        if self.connack == 0:
            self.connected.set()
        else:
            self.closed.set()

    def _on_disconnect(self, client, userdata, rc, properties=None):
        self.closed_at = time.monotonic()
        self.closed.set()

    def _on_subscribe(self, client, userdata, mid, granted, properties=None):
        codes = [int(g.value) if hasattr(g, "value") else int(g) for g in granted]
        with self._lock:
            self.subacks[mid] = codes

    def _on_message(self, client, userdata, m):
        with self._lock:
            self.received.append((m.topic, bytes(m.payload), getattr(m, "properties", None)))
        self.messages.put((m.topic, bytes(m.payload)))

    def connect(self):
        """Connects and returns the CONNACK code (None if the broker closed
        the connection without one)."""
        self.c.connect("127.0.0.1", self.port, keepalive=30,
                       **({"clean_start": self.clean} if self.v5 else {}))
        self.c.loop_start()
        _wait_for(lambda: self.connected.is_set() or self.closed.is_set(), msg="CONNACK")
        return self.connack

    def subscribe(self, *filters, qos=1):
        rc, mid = self.c.subscribe([(f, qos) for f in filters])
        assert rc == mqtt.MQTT_ERR_SUCCESS
        return _wait_for(lambda: self.subacks.get(mid), msg=f"SUBACK for {filters}")

    def publish(self, topic, payload, qos=1, properties=None):
        """Publishes with QoS 1 and waits for the PUBACK: mosquitto routes the
        message to subscribers before it acknowledges it, so afterwards the
        message is already queued (or dropped) for every receiver."""
        info = self.c.publish(topic, payload, qos=qos, properties=properties)
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

    def properties_of(self, topic, payload):
        """Properties of the first received (topic, payload) message."""
        with self._lock:
            for t, p, props in self.received:
                if (t, p) == (topic, payload):
                    return props
        raise AssertionError(f"{topic} {payload!r} was not received")

    def responses(self):
        with self._lock:
            return [json.loads(p) for t, p, _ in self.received if t == RESPONSE]

    def close(self):
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()


@pytest.fixture
def clients(broker):
    made = []

    def make(cert_name, client_id, b=None, **kw):
        c = Client(b or broker, cert_name, client_id, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def _connected(clients, cert_name, client_id=None, **kw):
    c = clients(cert_name, client_id if client_id is not None else CERTS[cert_name], **kw)
    assert c.connect() == 0, f"{client_id or cert_name} was refused"
    return c


def _service(clients, **kw):
    """The service (MQTT 5, to see user properties), listening to control
    responses. Only one can be connected at a time: same client id."""
    svc = _connected(clients, SERVICE_ID, protocol=mqtt.MQTTv5, **kw)
    assert svc.subscribe(RESPONSE) == [1]
    return svc


def _control(svc, op):
    """Sends a control op and returns the plugin's response to it. The
    response also proves the op has been applied (it is sent afterwards)."""
    n = len(svc.responses())
    svc.publish(CONTROL, json.dumps(op).encode())
    _wait_for(lambda: len(svc.responses()) > n, msg=f"control response to {op}")
    resps = svc.responses()[n:]
    assert len(resps) == 1, resps
    return resps[0]


def _user_props(props):
    return list(getattr(props, "UserProperty", []) or []) if props else []


# --------------------------------------------------------------------------
# Connect: identity rules and the registry


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["v311", "v5"])
def test_matching_client_id_connects(clients, protocol):
    assert clients("dev-001", "dev-001", protocol=protocol).connect() == 0
    assert clients(SERVICE_ID, SERVICE_ID, protocol=protocol).connect() == 0


def test_registry_admits_every_listed_cert(clients):
    # Both certificates of a device in its rotation grace period work.
    assert clients("dev-001-rotated", "dev-001").connect() == 0
    assert clients("dev-002", "dev-002").connect() == 0


@pytest.mark.parametrize("cert_name,client_id,username", [
    ("dev-001", "dev-002", None),        # someone else's id
    ("dev-001", "dev-002", "dev-002"),   # a username changes nothing
    ("dev-001", "dev-001x", None),       # prefix match is not a match
    ("dev-001", SERVICE_ID, None),       # a device cannot become the service
    ("dev-001", "", None),               # broker-assigned id
    ("bad-cn", "Bad_CN", None),          # CN is not a valid device id
    ("dev-unknown", "dev-unknown", None),    # not in the registry
    ("dev-disabled", "dev-disabled", None),  # disabled
    ("dev-revoked", "dev-revoked", None),    # revoked
    ("dev-001-unlisted", "dev-001", None),   # right CN, serial not listed
    ("provisioning", "provisioning", None),  # reserved name, even if listed
    (SERVICE_ID, "dev-001", None),       # the service keeps its own id
])
def test_mismatched_identity_refused(clients, broker, cert_name, client_id, username):
    c = clients(cert_name, client_id, username=username)
    assert c.connect() == CONNACK_V311_NOT_AUTHORIZED, broker.log()[-2000:]


def test_mismatched_identity_refused_v5(clients):
    c = clients("dev-001", "dev-002", protocol=mqtt.MQTTv5)
    assert c.connect() == CONNACK_V5_NOT_AUTHORIZED
    c = clients("dev-001-unlisted", "dev-001", protocol=mqtt.MQTTv5)
    assert c.connect() == CONNACK_V5_NOT_AUTHORIZED


def test_refused_impostor_does_not_disturb_connected_device(clients):
    """A refused CONNECT with a connected device's id must not make the
    plugin forget the device's connection record (DISCONNECT bookkeeping is
    per connection, not per id)."""
    svc = _connected(clients, SERVICE_ID)
    assert svc.subscribe("fleet/#") == [1]
    dev = _connected(clients, "dev-001")
    assert clients("dev-001-unlisted", "dev-001").connect() == CONNACK_V311_NOT_AUTHORIZED
    dev.publish("fleet/dev-001/measurements", b"still-here")
    assert svc.expect("fleet/dev-001/measurements", b"still-here") == []


# --------------------------------------------------------------------------
# Device ACLs


def test_device_publishes_only_under_own_id(clients):
    svc = _connected(clients, SERVICE_ID)
    assert svc.subscribe("$share/fleetml/fleet/+/measurements", "fleet/#") == [1, 1]
    dev = _connected(clients, "dev-001")

    for forbidden in ("fleet/dev-002/measurements", "fleet/dev-001", "fleet/dev-0011/x",
                      "other/dev-001/measurements", "fleet/provisioning/prov-x/request"):
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
           "fleet/dev-002/results", "fleet/dev-001", "$SYS/#", "$CONTROL/#", RESPONSE,
           "fleet/provisioning/#"]
    assert dev.subscribe(*bad) == [refused] * len(bad)
    good = ["fleet/dev-001/results", "fleet/dev-001/#", "fleet/dev-001/+/x"]
    assert dev.subscribe(*good) == [1] * len(good)


def test_service_may_subscribe_anything(clients):
    svc = _connected(clients, SERVICE_ID)
    assert svc.subscribe("#", "fleet/+/results", "$share/fleetml/fleet/+/measurements") == [1, 1, 1]


@pytest.mark.parametrize("client_id", [SERVICE_ID, "fleetml-service.n1"])
def test_service_over_its_socket(clients, client_id):
    """On the service socket the service needs no certificate: it may
    subscribe to anything, send control ops, and answer a device."""
    svc = _connected(clients, None, client_id, listener="socket", protocol=mqtt.MQTTv5)
    assert svc.subscribe("$share/fleetml/fleet/+/measurements", RESPONSE) == [1, 1]
    # The plugin answers control ops only to the service.
    assert _control(svc, {"op": "no-such-op"})["ok"] is False
    dev = _connected(clients, "dev-001")
    assert dev.subscribe("fleet/dev-001/results") == [1]
    dev.publish("fleet/dev-001/measurements", b'{"id":"m-1"}')
    svc.expect("fleet/dev-001/measurements", b'{"id":"m-1"}')
    svc.publish("fleet/dev-001/results", b'{"id":"m-1","status":"ok"}')
    dev.expect("fleet/dev-001/results", b'{"id":"m-1","status":"ok"}')


@pytest.mark.parametrize("client_id", ["dev-001", "prov-0a1b", "fleetml-serviceX",
                                       "fleetml-service.N1"])
def test_socket_refuses_everyone_but_the_service(clients, broker, client_id):
    """A device or claim id on the socket is refused (it has no certificate
    there, and the socket is the service's alone)."""
    mark = len(broker.log())
    c = clients(None, client_id, listener="socket")
    assert c.connect() == CONNACK_V311_NOT_AUTHORIZED
    _wait_for(lambda: "only the service may use the service socket" in broker.log_since(mark),
              msg="the refusal in the broker log")


def test_service_socket_must_be_absolute(env, tmp_path):
    """A relative socket path could never be told from an address: the
    plugin refuses to start with one."""
    registry = tmp_path / "registry.json"
    _write_atomic(registry, _base_registry(env["serials"]))
    b = Broker(tmp_path, env["plugin"], env["certs"], env["serials"], registry)
    b.socket = Path("relative.sock")
    conf = tmp_path / "mosquitto.conf"
    b.ports = dict(zip(("main", "identity"), _free_ports(2)))
    conf.write_text(b._conf().replace(f"listener 0 {b.socket}\n", ""))
    out = subprocess.run([env["binary"], "-c", str(conf)], capture_output=True, text=True,
                         timeout=30, cwd=tmp_path)
    assert out.returncode != 0
    assert "plugin_opt_service_socket must be an absolute path" in out.stdout + out.stderr


def test_offline_persistent_session_queues_own_topics(clients):
    """An offline device's persistent session has no certificate and no
    connection record; messages on its own topics are still queued for it."""
    svc = _connected(clients, SERVICE_ID)
    dev = _connected(clients, "dev-002", clean=False)
    assert dev.subscribe("fleet/dev-002/results") == [1]
    mark = len(svc.broker.log())
    dev.close()
    # Only once the broker has processed the DISCONNECT is the session
    # offline; its log line says so.
    _wait_for(lambda: "Client dev-002 disconnected" in svc.broker.log_since(mark),
              msg="broker noticed dev-002 disconnect")
    svc.publish("fleet/dev-002/results", b"queued-while-offline")
    again = _connected(clients, "dev-002", clean=False)
    assert again.expect("fleet/dev-002/results", b"queued-while-offline") == []


def test_identity_listener_falls_back_to_acl(clients):
    """With use_identity_as_username, mosquitto 2.0.11 does not call
    BASIC_AUTH, so an impostor may complete CONNECT; without the connection
    record BASIC_AUTH makes, the ACL check refuses devices everything (the
    registry was never consulted). If a future mosquitto refuses the CONNECT
    instead, that is stronger and also accepted."""
    svc = _connected(clients, SERVICE_ID, listener="identity")
    assert svc.subscribe("fleet/#") == [1]
    for cert, cid in (("dev-001", "dev-002"), ("dev-001", "dev-001"),
                      ("dev-revoked", "dev-revoked")):
        imp = clients(cert, cid, listener="identity")
        rc = imp.connect()
        if rc != 0:
            assert rc == CONNACK_V311_NOT_AUTHORIZED
            continue
        assert imp.subscribe(f"fleet/{cid}/results", "fleet/dev-001/results") == [0x80, 0x80]
        imp.publish(f"fleet/{cid}/measurements", b"impostor")
        imp.publish("fleet/dev-001/measurements", b"impostor")
    svc.publish("fleet/dev-001/measurements", b"marker")
    assert svc.expect("fleet/dev-001/measurements", b"marker") == []


# --------------------------------------------------------------------------
# Claim clients


def test_claim_client_connects_and_is_confined(clients):
    svc = _connected(clients, SERVICE_ID, protocol=mqtt.MQTTv5)
    assert svc.subscribe("fleet/provisioning/+/request", "fleet/provisioning/#") == [1, 1]
    cid = "prov-SN_0042-x"
    claim = _connected(clients, "claim-a", cid, protocol=mqtt.MQTTv5)
    other = _connected(clients, "claim-a", "prov-other", protocol=mqtt.MQTTv5)

    denied = SUBACK_V5_NOT_AUTHORIZED
    bad = ["fleet/provisioning/#", "fleet/provisioning/+/accepted",
           "fleet/provisioning/prov-other/accepted", f"fleet/provisioning/{cid}/request",
           f"fleet/provisioning/{cid}/#", f"fleet/provisioning/{cid}", "fleet/#",
           "$CONTROL/#", "$SYS/#", f"$share/g/fleet/provisioning/{cid}/accepted"]
    assert claim.subscribe(*bad) == [denied] * len(bad)
    good = [f"fleet/provisioning/{cid}/accepted", f"fleet/provisioning/{cid}/rejected",
            f"fleet/provisioning/{cid}/+"]
    assert claim.subscribe(*good) == [1] * len(good)

    for forbidden in ("fleet/provisioning/prov-other/request", f"fleet/provisioning/{cid}/accepted",
                      f"fleet/provisioning/{cid}", "fleet/tmpl-a/x", "fleet/dev-001/measurements"):
        claim.publish(forbidden, b"forbidden")
    claim.publish(f"fleet/provisioning/{cid}/request", b'{"serial":"SN_0042-x"}')
    early = svc.expect(f"fleet/provisioning/{cid}/request", b'{"serial":"SN_0042-x"}')
    assert all(m[0] == f"fleet/provisioning/{cid}/request" for m in early), early

    # Replies reach only the client they are for.
    svc.publish("fleet/provisioning/prov-other/accepted", b"not-yours")
    svc.publish(f"fleet/provisioning/{cid}/accepted", b"yours")
    assert claim.expect(f"fleet/provisioning/{cid}/accepted", b"yours") == []
    assert other.messages.empty()


@pytest.mark.parametrize("cert_name,client_id", [
    ("claim-a", "dev-001"),               # claim cert cannot act as a device
    ("claim-a", "claim:tmpl-a"),          # nor use its CN as id
    ("claim-a", "prov-"),                 # empty serial
    ("claim-a", "prov-" + "a" * 65),      # serial too long
    ("claim-a", "prov-a/b"),              # topic separator
    ("claim-a", "prov-a+b"),              # wildcard
    ("claim-a", "xprov-abc"),
    ("claim-a-unlisted", "prov-abc"),     # claim cert serial not allowed
    ("claim-b", "prov-abc"),              # template disabled
    ("dev-001", "prov-abc"),              # device cert cannot claim
])
def test_claim_refused(clients, cert_name, client_id):
    assert clients(cert_name, client_id).connect() == CONNACK_V311_NOT_AUTHORIZED


def test_claim_request_gets_template_property(clients):
    svc = _connected(clients, SERVICE_ID, protocol=mqtt.MQTTv5)
    assert svc.subscribe("fleet/provisioning/+/request") == [1]
    cid = "prov-props1"
    claim = _connected(clients, "claim-a", cid, protocol=mqtt.MQTTv5)
    forged = Properties(PacketTypes.PUBLISH)
    forged.UserProperty = ("fleetml-claim-template", "tmpl-b")
    forged.UserProperty = ("FleetML-Cert-Serial", "00")
    forged.UserProperty = ("model", "x1")
    claim.publish(f"fleet/provisioning/{cid}/request", b"forged", properties=forged)
    # A v3.1.1 claim client has no properties of its own; it gets the tag too.
    cid2 = "prov-props2"
    claim311 = _connected(clients, "claim-a", cid2)
    claim311.publish(f"fleet/provisioning/{cid2}/request", b"plain")

    svc.expect(f"fleet/provisioning/{cid}/request", b"forged")
    svc.expect(f"fleet/provisioning/{cid2}/request", b"plain")
    got = _user_props(svc.properties_of(f"fleet/provisioning/{cid}/request", b"forged"))
    assert sorted(got) == sorted([("model", "x1"), ("fleetml-claim-template", "tmpl-a")]), got
    got = _user_props(svc.properties_of(f"fleet/provisioning/{cid2}/request", b"plain"))
    assert got == [("fleetml-claim-template", "tmpl-a")], got


# --------------------------------------------------------------------------
# Message properties of devices


def test_device_forged_properties_stripped_and_serial_added(clients, broker):
    svc = _connected(clients, SERVICE_ID, protocol=mqtt.MQTTv5)
    assert svc.subscribe("fleet/dev-001/#") == [1]
    dev = _connected(clients, "dev-001-rotated", "dev-001", protocol=mqtt.MQTTv5)
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("fleetml-cert-serial", "forged")
    props.UserProperty = ("fleetml-claim-template", "tmpl-a")
    props.UserProperty = ("keep", "me")
    props.ContentType = "application/json"
    props.ResponseTopic = "fleet/dev-001/reply"
    props.CorrelationData = b"\x00\x01corr"
    props.PayloadFormatIndicator = 1
    props.MessageExpiryInterval = 300
    dev.publish("fleet/dev-001/cert/rotate", b"rotate", properties=props)
    plain = Properties(PacketTypes.PUBLISH)
    plain.UserProperty = ("keep", "too")
    dev.publish("fleet/dev-001/measurements", b"plain", properties=plain)

    svc.expect("fleet/dev-001/cert/rotate", b"rotate")
    svc.expect("fleet/dev-001/measurements", b"plain")
    serial = broker.serials["dev-001-rotated"]
    got = svc.properties_of("fleet/dev-001/cert/rotate", b"rotate")
    assert sorted(_user_props(got)) == sorted([("keep", "me"), ("fleetml-cert-serial", serial)])
    # Everything else survives the rebuilt property list.
    assert got.ContentType == "application/json"
    assert got.ResponseTopic == "fleet/dev-001/reply"
    assert got.CorrelationData == b"\x00\x01corr"
    assert got.PayloadFormatIndicator == 1
    got = svc.properties_of("fleet/dev-001/measurements", b"plain")
    assert sorted(_user_props(got)) == sorted([("keep", "too"), ("fleetml-cert-serial", serial)])


def test_service_properties_untouched(clients):
    svc = _connected(clients, SERVICE_ID, protocol=mqtt.MQTTv5)
    assert svc.subscribe("fleet/dev-001/results") == [1]
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("fleetml-request-id", "r1")
    svc.publish("fleet/dev-001/results", b"svc", properties=props)
    svc.expect("fleet/dev-001/results", b"svc")
    assert _user_props(svc.properties_of("fleet/dev-001/results", b"svc")) == [
        ("fleetml-request-id", "r1")]


def test_device_will_cannot_carry_forged_properties(clients, broker):
    """Wills bypass MOSQ_EVT_MESSAGE, so their properties cannot be cleaned;
    mosquitto reports DISCONNECT (dropping the record) before it sends the
    will, so the ACL refuses device wills altogether. A device with a will
    still connects normally."""
    svc = _connected(clients, SERVICE_ID, protocol=mqtt.MQTTv5)
    assert svc.subscribe("fleet/dev-002/#") == [1]
    props = Properties(PacketTypes.WILLMESSAGE)
    props.UserProperty = ("fleetml-cert-serial", "forged")
    dev = _connected(clients, "dev-002", protocol=mqtt.MQTTv5,
                     will=("fleet/dev-002/status", b"offline", props))
    dev.publish("fleet/dev-002/measurements", b"alive")
    svc.expect("fleet/dev-002/measurements", b"alive")
    # Drop the TCP connection without DISCONNECT so the broker sends the will.
    mark = len(broker.log())
    dev.c.loop_stop()
    dev.c.socket().shutdown(socket.SHUT_RDWR)
    _wait_for(lambda: any(s in broker.log_since(mark) for s in (
        "Socket error on client dev-002", "Client dev-002 closed its connection",
        "Client dev-002 disconnected")), msg="broker noticed the drop")
    svc.publish("fleet/dev-002/measurements", b"marker")
    early = svc.expect("fleet/dev-002/measurements", b"marker")
    for topic, payload in early:
        assert topic != "fleet/dev-002/status" or all(
            n != "fleetml-cert-serial" or v != "forged"
            for n, v in _user_props(svc.properties_of(topic, payload))), early


# --------------------------------------------------------------------------
# Control ops


def test_revocation_kicks_within_one_second(clients, broker):
    svc = _service(clients)
    for protocol in (mqtt.MQTTv311, mqtt.MQTTv5):
        assert _control(svc, {"op": "device", "id": "dev-kick", "status": "active",
                              "certs": [broker.serials["dev-kick"]]})["ok"] is True
        dev = _connected(clients, "dev-kick", protocol=protocol)
        t0 = time.monotonic()
        resp = _control(svc, {"op": "device", "id": "dev-kick", "status": "revoked", "certs": []})
        assert resp == {"op": "device", "ok": True}
        _wait_for(dev.closed.is_set, timeout=1.0, msg="dev-kick kicked")
        elapsed = dev.closed_at - t0
        assert elapsed < 1.0, elapsed
        assert clients("dev-kick", "dev-kick").connect() == CONNACK_V311_NOT_AUTHORIZED


@pytest.mark.parametrize("op", [
    {"op": "device", "id": "dev-kick", "status": "disabled",
     "certs": ["__serial__"]},                           # disabled
    {"op": "device", "id": "dev-kick", "status": "active", "certs": ["0abc"]},  # cert dropped
    {"op": "device_remove", "id": "dev-kick"},          # forgotten
], ids=["disabled", "cert-removed", "removed"])
def test_other_changes_kick(clients, broker, op):
    svc = _service(clients)
    serial = broker.serials["dev-kick"]
    assert _control(svc, {"op": "device", "id": "dev-kick", "status": "active",
                          "certs": [serial]})["ok"] is True
    dev = _connected(clients, "dev-kick")
    bystander = _connected(clients, "dev-002")
    op = json.loads(json.dumps(op).replace("__serial__", serial))
    assert _control(svc, op)["ok"] is True
    _wait_for(dev.closed.is_set, timeout=1.0, msg="dev-kick kicked")
    assert not bystander.closed.is_set()


def test_cert_still_allowed_is_not_kicked(clients, broker):
    svc = _service(clients)
    dev = _connected(clients, "dev-001")
    # Rotation: a new serial is added, the connection's serial stays.
    resp = _control(svc, {"op": "device", "id": "dev-001", "status": "active",
                          "certs": [broker.serials["dev-001"], broker.serials["dev-001-rotated"],
                                    "0123abcd"]})
    assert resp["ok"] is True
    assert svc.subscribe("fleet/dev-001/#") == [1]
    dev.publish("fleet/dev-001/measurements", b"still-connected")
    svc.expect("fleet/dev-001/measurements", b"still-connected")
    assert not dev.closed.is_set()


def test_template_disable_kicks_claim_clients(clients, broker):
    svc = _service(clients)
    serial = broker.serials["claim-kick"]
    claim = _connected(clients, "claim-kick", "prov-kick1")
    dev = _connected(clients, "dev-002")
    resp = _control(svc, {"op": "template", "name": "tmpl-k", "status": "disabled",
                          "claim_certs": [serial]})
    assert resp == {"op": "template", "ok": True}
    _wait_for(claim.closed.is_set, timeout=1.0, msg="claim client kicked")
    assert clients("claim-kick", "prov-kick2").connect() == CONNACK_V311_NOT_AUTHORIZED
    assert not dev.closed.is_set()
    assert _control(svc, {"op": "template", "name": "tmpl-k", "status": "active",
                          "claim_certs": [serial]})["ok"] is True
    assert clients("claim-kick", "prov-kick3").connect() == 0


@pytest.mark.parametrize("payload,error", [
    (b"not json", "payload is not a JSON object"),
    (b"[1,2]", "payload is not a JSON object"),
    (b"{}", "missing op"),
    (b'{"op": "nope"}', "unknown op"),
    (b'{"op": "device", "id": "Bad_ID", "status": "active", "certs": []}', "invalid device id"),
    (b'{"op": "device", "id": "dev-x1", "status": "gone", "certs": []}', "invalid status"),
    (b'{"op": "device", "id": "dev-x1", "status": "active", "certs": "ab"}',
     "certificate list is not an array"),
    (b'{"op": "device", "id": "dev-x1", "status": "active", "certs": ["xyz"]}',
     "invalid certificate serial"),
    (b'{"op": "template", "name": "t", "status": "active", "claim_certs": []}',
     "invalid template name"),
    (b'{"op": "template", "name": "tmpl-z", "status": "revoked", "claim_certs": []}',
     "invalid status"),
    (b'{"op": "device_remove"}', "invalid device id"),
    (b'{"op": "device", "op": "reload"}', "payload is not a JSON object"),  # duplicate key
    (b"\xff\xfe{", "payload is not a JSON object"),
    (b"[" * 5000 + b"]" * 5000, "payload is not a JSON object"),  # nesting bomb
    (b'{"op": "reload", "pad": "' + b"x" * 300_000 + b'"}', "payload too large"),
])
def test_control_rejects_bad_input(clients, payload, error):
    svc = _service(clients)
    n = len(svc.responses())
    svc.publish(CONTROL, payload)
    _wait_for(lambda: len(svc.responses()) > n, msg="control response")
    resp = svc.responses()[n]
    assert resp["ok"] is False and resp["error"] == error, resp


def test_control_from_device_is_ignored(clients, broker):
    svc = _service(clients)
    victim = _connected(clients, "dev-002")
    for protocol in (mqtt.MQTTv311, mqtt.MQTTv5):
        attacker = _connected(clients, "dev-001", protocol=protocol)
        attacker.publish(CONTROL, json.dumps(
            {"op": "device", "id": "dev-002", "status": "revoked", "certs": []}).encode())
        attacker.publish(CONTROL, b'{"op":"reload"}')
        attacker.close()
    # The service's op is answered; had the device's been processed, its
    # responses would have come first.
    assert _control(svc, {"op": "device", "id": "dev-zzz", "status": "disabled",
                          "certs": []}) == {"op": "device", "ok": True}
    assert svc.responses() == [{"op": "device", "ok": True}]
    assert not victim.closed.is_set()
    assert clients("dev-002", "dev-002").connect() == 0  # still active


def test_reload_picks_up_rewritten_snapshot(clients, broker):
    base = _base_registry(broker.serials)
    svc = _service(clients)
    gone = _connected(clients, "dev-gone")
    stay = _connected(clients, "dev-002")
    assert clients("dev-reload", "dev-reload").connect() == CONNACK_V311_NOT_AUTHORIZED
    new = json.loads(json.dumps(base))
    del new["devices"]["dev-gone"]
    new["devices"]["dev-reload"] = {"status": "active", "certs": [broker.serials["dev-reload"]]}
    try:
        _write_atomic(broker.registry, new)
        assert _control(svc, {"op": "reload"}) == {"op": "reload", "ok": True}
        _wait_for(gone.closed.is_set, timeout=1.0, msg="dev-gone kicked by reload")
        assert not stay.closed.is_set()
        assert clients("dev-reload", "dev-reload").connect() == 0
        assert clients("dev-gone", "dev-gone").connect() == CONNACK_V311_NOT_AUTHORIZED

        # A broken snapshot is reported and the last good view stays.
        broker.registry.write_text('{"format": 1, "devices": ')
        resp = _control(svc, {"op": "reload"})
        assert resp["ok"] is False and "JSON error" in resp["error"], resp
        assert clients("dev-reload", "dev-reload").connect() == 0
        _write_atomic(broker.registry, {"format": 2})
        assert _control(svc, {"op": "reload"})["ok"] is False
    finally:
        _write_atomic(broker.registry, base)
        assert _control(svc, {"op": "reload"})["ok"] is True


def test_snapshot_op_replaces_view(clients, broker):
    """External brokers get the whole view over MQTT: a "snapshot" op holds
    the snapshot document; one older than the view ("seq" below the newest
    op's) is refused."""
    base = _base_registry(broker.serials)
    svc = _service(clients)
    gone = _connected(clients, "dev-gone")
    new = json.loads(json.dumps(base))
    del new["devices"]["dev-gone"]
    new["devices"]["dev-reload"] = {"status": "active", "certs": [broker.serials["dev-reload"]]}
    try:
        assert _control(svc, {"op": "snapshot", "seq": 10, **new}) == \
            {"op": "snapshot", "ok": True}
        _wait_for(gone.closed.is_set, timeout=1.0, msg="dev-gone kicked by the snapshot")
        assert clients("dev-reload", "dev-reload").connect() == 0
        assert clients("dev-gone", "dev-gone").connect() == CONNACK_V311_NOT_AUTHORIZED
        # An op read at seq 12 moves the view past a snapshot read at 11.
        assert _control(svc, {"op": "device", "id": "dev-gone", "status": "active",
                              "certs": [broker.serials["dev-gone"]], "seq": 12})["ok"] is True
        resp = _control(svc, {"op": "snapshot", "seq": 11, **new})
        assert resp["ok"] is False and "stale snapshot" in resp["error"], resp
        assert clients("dev-gone", "dev-gone").connect() == 0
        # A malformed one changes nothing.
        resp = _control(svc, {"op": "snapshot", "seq": 20, "format": 2})
        assert resp["ok"] is False, resp
        assert clients("dev-reload", "dev-reload").connect() == 0
    finally:
        assert _control(svc, {"op": "snapshot", "seq": 30, **base})["ok"] is True
    assert clients("dev-reload", "dev-reload").connect() == CONNACK_V311_NOT_AUTHORIZED


def test_snapshot_in_parts(clients, broker):
    """A large view comes in parts under one "gen", installed at the last
    part; two senders may interleave; a part out of order drops its gen."""
    base = _base_registry(broker.serials)
    svc = _service(clients)
    devs = list(base["devices"].items())
    with_reload = dict(devs + [("dev-reload", {"status": "active",
                                               "certs": [broker.serials["dev-reload"]]})])

    def part(gen, i, n, seq, devices, templates=None):
        return {"op": "snapshot", "format": 1, "seq": seq, "gen": gen, "part": i, "parts": n,
                "devices": devices, "templates": templates or {}}
    try:
        a = [dict(list(with_reload.items())[:3]), dict(list(with_reload.items())[3:])]
        assert _control(svc, part("A", 0, 3, 100, a[0]))["ok"] is True
        # Another sender's snapshot interleaves (and is complete at once).
        assert _control(svc, part("B", 0, 2, 100, dict(devs[:4])))["ok"] is True
        assert _control(svc, part("A", 1, 3, 100, a[1]))["ok"] is True
        # Not installed before its last part.
        assert clients("dev-reload", "dev-reload").connect() == CONNACK_V311_NOT_AUTHORIZED
        assert _control(svc, part("A", 2, 3, 100, {}, base["templates"]))["ok"] is True
        assert clients("dev-reload", "dev-reload").connect() == 0
        assert clients("claim-a", "prov-parts").connect() == 0
        # B's part 1 completes a view of seq 100, as new as the view: taken.
        assert _control(svc, part("B", 1, 2, 100, dict(devs[4:]), base["templates"]))["ok"]
        assert clients("dev-reload", "dev-reload").connect() == CONNACK_V311_NOT_AUTHORIZED
        # Out of order: part 2 after part 0 drops gen C; its part 1 then has no gen.
        assert _control(svc, part("C", 0, 3, 200, {}))["ok"] is True
        r = _control(svc, part("C", 2, 3, 200, {}))
        assert r["ok"] is False and "out of order" in r["error"], r
        r = _control(svc, part("C", 1, 3, 200, {}))
        assert r["ok"] is False and "out of order" in r["error"], r
        r = _control(svc, {"op": "snapshot", "format": 1, "part": 0, "parts": 2})
        assert r["ok"] is False and "gen" in r["error"], r
        assert clients("dev-002", "dev-002").connect() == 0
    finally:
        assert _control(svc, {"op": "snapshot", "seq": 300, **base})["ok"] is True


@pytest.mark.parametrize("client_id,ok", [
    ("fleetml-service.n1", True), ("fleetml-service.node-2", True),
    ("fleetml-service.", False), ("fleetml-service.N1", False), ("fleetml-serviceX", False),
    ("fleetml-service.a/b", False), ("fleetml-service." + "a" * 64, False)])
def test_service_client_id_with_node(clients, client_id, ok):
    """Nodes sharing one broker connect with the service certificate as
    "<service id>.<node id>", each with its own session."""
    c = clients(SERVICE_ID, client_id, protocol=mqtt.MQTTv5)
    rc = c.connect()
    assert (rc == 0) is ok, (client_id, rc)
    if ok:
        # A service may subscribe to the service-only topics, e.g. $CONTROL responses.
        assert c.subscribe(RESPONSE) == [1]


def test_two_service_nodes_at_once(clients):
    a = _connected(clients, SERVICE_ID, "fleetml-service.n1", protocol=mqtt.MQTTv5)
    b = _connected(clients, SERVICE_ID, "fleetml-service.n2", protocol=mqtt.MQTTv5)
    assert not a.closed.is_set() and not b.closed.is_set()


# --------------------------------------------------------------------------
# A broker whose snapshot is missing at start-up


def test_missing_snapshot_fails_closed(env, tmp_path):
    registry = tmp_path / "missing" / "registry.json"
    b = Broker(tmp_path, env["plugin"], env["certs"], env["serials"], registry)
    made = []

    def client(*a, **kw):
        c = Client(b, *a, **kw)
        made.append(c)
        return c

    try:
        b.start(env["binary"])
        assert client("dev-001", "dev-001").connect() == CONNACK_V311_NOT_AUTHORIZED
        assert client("claim-a", "prov-abc").connect() == CONNACK_V311_NOT_AUTHORIZED
        svc = client(SERVICE_ID, SERVICE_ID, protocol=mqtt.MQTTv5)
        assert svc.connect() == 0
        assert svc.subscribe(RESPONSE, "fleet/#") == [1, 1]
        # An upsert alone does not end fail-closed: the view is incomplete.
        assert _control(svc, {"op": "device", "id": "dev-001", "status": "active",
                              "certs": [env["serials"]["dev-001"]]})["ok"] is True
        assert client("dev-001", "dev-001").connect() == CONNACK_V311_NOT_AUTHORIZED
        resp = _control(svc, {"op": "reload"})
        assert resp["ok"] is False and "cannot open" in resp["error"], resp
        # Once fleetml has written the snapshot, a reload admits devices.
        registry.parent.mkdir()
        _write_atomic(registry, _base_registry(env["serials"]))
        assert _control(svc, {"op": "reload"}) == {"op": "reload", "ok": True}
        assert client("dev-001", "dev-001").connect() == 0
        assert client("claim-a", "prov-abc").connect() == 0
        assert b.alive()
    finally:
        for c in made:
            c.close()
        b.stop()
