"""Hostile MQTT traffic against a running platform.

Every case has an offender that talks to the device listener with raw
sockets (Python's ssl module, packets built by hand below) and a well
behaved device (paho, `GoodTraffic`) that sends measurements before, during
and after the attack.  The `guard` fixture checks around each case that

* the good device gets an `ok` result for every measurement, each within
  GOOD_REPLY_MAX_S;
* `fleetml serve` and the broker survive: serve is still running and
  GET /healthz reports the same broker pid as before;
* neither process grows by more than RSS_GROWTH_MAX_KB (VmRSS of
  /proc/<pid>/status before and after the case);

and each case checks how the offender was dropped: the broker closes its
connection (protocol violations, oversize packets) or refuses the message
(PUBACK >= 0x80, or 0x10 "no matching subscribers": nobody gets it), and
nothing is stored for it.  Traffic that is legal MQTT (10,000 user
properties, a flood of small QoS 1 publishes) is served, and the point is
that it does not hurt anyone else.

Two cases guard against problems found here: a PUBLISH with one forged
fleetml-* user property among ~43,000 small ones used to stall the broker
(the plugin now refuses messages with more than 64 properties), and a
burst of large payloads from one device used to delay everybody's results
and inflate serve (devices are now rate-limited and the pipeline queue is
bounded in bytes).

Connections that never send CONNECT, or never start TLS, are closed by
mosquitto only after ~95 s; FM_HOSTILE_SLOW=1 runs the case that waits for
it.

One platform serves the whole module (init and start are the slow part);
every case uses its own offender device id.
"""

import json
import os
import socket
import ssl
import struct
import threading
import time

import pytest

from helpers import (WaitTimeout, make_measurement, metric_value, unique_id, vm_rss_kb,
                     wait_for)

GOOD = "good-dev"
OFFENDERS = [
    "evil-first-publish", "evil-remlen", "evil-topic", "evil-longtopic", "evil-oversize",
    "evil-props", "evil-flood", "evil-idle",
]

# Bounds.
RSS_GROWTH_MAX_KB = 50 * 1024      # per case, for serve and for mosquitto
GOOD_REPLY_MAX_S = 5.0             # every result of the good device
CLOSE_TIMEOUT_S = 10.0             # the broker closes a protocol offender

# Limits from docs/protocol.md (defaults of the node).
MAX_PAYLOAD = 131072
MAX_PACKET = 2 * MAX_PAYLOAD + 4096   # broker.max_packet_size in mosquitto.conf

# --------------------------------------------------------------------------
# MQTT 5 packets, built by hand.
#
# Every packet is   fixed header | variable header | payload
#
#   fixed header   byte 0: packet type << 4 | flags (PUBLISH: DUP<<3 | QoS<<1 | RETAIN,
#                  SUBSCRIBE: 0b0010, everything else used here: 0)
#                  then the Remaining Length: the number of bytes after the
#                  fixed header, as a Variable Byte Integer (VBI)
#   VBI            7 bits per byte, least significant group first; bit 7 set
#                  means "another byte follows"; at most 4 bytes (max 268435455)
#   UTF-8 string   u16 big-endian length + bytes;  binary data: the same
#   properties     VBI length of the property bytes, then for each property
#                  its identifier (a VBI, one byte for all ids used here) and
#                  its value, whose type the identifier fixes


PT_CONNECT, PT_CONNACK, PT_PUBLISH, PT_PUBACK = 1, 2, 3, 4
PT_SUBSCRIBE, PT_SUBACK, PT_DISCONNECT = 8, 9, 14

# Property identifiers (MQTT 5, 2.2.2.2) and their value types.
PROP_SESSION_EXPIRY = 0x11       # u32
PROP_RECEIVE_MAXIMUM = 0x21      # u16
PROP_MAXIMUM_PACKET_SIZE = 0x27  # u32
PROP_RESPONSE_TOPIC = 0x08       # UTF-8 string
PROP_CORRELATION_DATA = 0x09     # binary data
PROP_USER_PROPERTY = 0x26        # UTF-8 string pair (name, value)
PROP_REASON_STRING = 0x1F        # UTF-8 string


def vbi(n):
    """Variable Byte Integer."""
    assert 0 <= n <= 268435455
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mstr(s):
    """UTF-8 string (or binary data when given bytes): u16 length + bytes."""
    b = s.encode() if isinstance(s, str) else bytes(s)
    assert len(b) <= 0xFFFF
    return struct.pack("!H", len(b)) + b


def prop_u16(pid, v):
    return bytes([pid]) + struct.pack("!H", v)


def prop_u32(pid, v):
    return bytes([pid]) + struct.pack("!I", v)


def prop_str(pid, s):
    return bytes([pid]) + mstr(s)


def prop_pair(name, value):
    return bytes([PROP_USER_PROPERTY]) + mstr(name) + mstr(value)


def props(*encoded):
    """A property block: VBI length + the properties' bytes."""
    body = b"".join(encoded)
    return vbi(len(body)) + body


def packet(ptype, flags, body):
    """Fixed header (type, flags, VBI remaining length) + body."""
    return bytes([ptype << 4 | flags]) + vbi(len(body)) + body


def connect_packet(client_id, keepalive=30, clean_start=True, properties=b""):
    """CONNECT (type 1).

    variable header: protocol name "MQTT" (UTF-8 string 00 04 4D 51 54 54),
                     protocol level 5,
                     connect flags (bit 7 user name, 6 password, 5 will retain,
                     4-3 will QoS, 2 will, 1 clean start, 0 reserved = 0),
                     keep alive (u16 seconds),
                     properties
    payload:         client identifier (UTF-8 string); no will, user name or
                     password (identity is the certificate)"""
    flags = 0x02 if clean_start else 0x00
    vh = mstr("MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive) + props(properties)
    return packet(PT_CONNECT, 0, vh + mstr(client_id))


def publish_packet(topic, payload, qos=1, packet_id=1, properties=b"", raw_topic=None):
    """PUBLISH (type 3, flags DUP<<3 | QoS<<1 | RETAIN).

    variable header: topic name (UTF-8 string; `raw_topic` gives its bytes
                     unchecked, e.g. invalid UTF-8), packet identifier (u16,
                     only when QoS > 0), properties
    payload:         the application message, up to the end of the packet"""
    t = struct.pack("!H", len(raw_topic)) + raw_topic if raw_topic is not None else mstr(topic)
    vh = t + (struct.pack("!H", packet_id) if qos else b"") + props(properties)
    return packet(PT_PUBLISH, qos << 1, vh + payload)


def subscribe_packet(topic_filter, packet_id=1, qos=1):
    """SUBSCRIBE (type 8, flags 0b0010).

    variable header: packet identifier (u16), properties (none)
    payload:         topic filter (UTF-8 string) + subscription options byte
                     (bits 1-0 maximum QoS)"""
    vh = struct.pack("!H", packet_id) + props(b"")
    return packet(PT_SUBSCRIBE, 0x02, vh + mstr(topic_filter) + bytes([qos]))


def disconnect_packet(reason=0):
    """DISCONNECT (type 14): reason code, properties."""
    return packet(PT_DISCONNECT, 0, bytes([reason]) + props(b""))


def parse_vbi(buf, pos):
    """(value, next position) of the VBI at buf[pos]; ValueError if malformed."""
    mult, val = 1, 0
    for i in range(4):
        if pos + i >= len(buf):
            raise IndexError("truncated VBI")
        b = buf[pos + i]
        val += (b & 0x7F) * mult
        if not b & 0x80:
            return val, pos + i + 1
        mult <<= 7
    raise ValueError("VBI longer than 4 bytes")


class Packet:
    def __init__(self, ptype, flags, body):
        self.type, self.flags, self.body = ptype, flags, body

    @property
    def reason(self):
        """Reason code of CONNACK (byte 1), PUBACK (byte 2, 0 when
        omitted) and DISCONNECT (byte 0, 0 when omitted)."""
        if self.type == PT_CONNACK:
            return self.body[1]
        if self.type == PT_PUBACK:
            return self.body[2] if len(self.body) > 2 else 0
        if self.type == PT_DISCONNECT:
            return self.body[0] if self.body else 0
        if self.type == PT_SUBACK:
            plen, pos = parse_vbi(self.body, 2)   # after the packet id
            return self.body[pos + plen]
        return None

    @property
    def packet_id(self):
        if self.type in (PT_PUBACK, PT_SUBACK):
            return struct.unpack("!H", self.body[:2])[0]
        return None

    def __repr__(self):
        return f"Packet(type={self.type}, reason={self.reason!r}, len={len(self.body)})"


# --------------------------------------------------------------------------
# A raw TLS client.


class Closed(Exception):
    """The peer closed the connection (EOF, reset, or a TLS alert)."""


class RawClient:
    """One TCP connection to the device listener, optionally with TLS and a
    client certificate.  Sends bytes as given and parses what comes back
    into packets, so malformed traffic can be written exactly."""

    def __init__(self, platform, device_id=None, tls=True, cert=True):
        self.platform = platform
        self.sock = socket.create_connection(("127.0.0.1", platform.broker_port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.closed_at = None
        self.close_reason = None
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(platform.ca_cert)
            ctx.check_hostname = False
            if cert:
                d = platform.device_dir(device_id)
                ctx.load_cert_chain(str(d / "device.crt"), str(d / "device.key"))
            try:
                self.sock = ctx.wrap_socket(self.sock, server_hostname="127.0.0.1")
            except BaseException:
                self.sock.close()
                raise

    def send(self, data, timeout=CLOSE_TIMEOUT_S):
        """Writes data; a broker that stops reading makes this fail after
        timeout seconds instead of blocking for ever."""
        self.sock.settimeout(timeout)
        self.sock.sendall(data)

    def _fill(self, deadline):
        """Reads more bytes into buf; raises Closed on EOF or error,
        socket.timeout when the deadline passes."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout()
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise
        except (ssl.SSLError, OSError) as e:
            self._mark_closed(repr(e))
            raise Closed(repr(e)) from None
        if not data:
            self._mark_closed("EOF")
            raise Closed("EOF")
        self.buf += data

    def _mark_closed(self, why):
        if self.closed_at is None:
            self.closed_at = time.monotonic()
            self.close_reason = why

    def read_packet(self, timeout=5.0):
        """The next complete packet; raises Closed or socket.timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 2:
                try:
                    rl, pos = parse_vbi(self.buf, 1)
                except IndexError:
                    rl = None
                if rl is not None and len(self.buf) >= pos + rl:
                    p = Packet(self.buf[0] >> 4, self.buf[0] & 0x0F, bytes(self.buf[pos:pos + rl]))
                    del self.buf[:pos + rl]
                    return p
            self._fill(deadline)

    def expect(self, ptype, timeout=5.0):
        """Reads packets until one of type ptype; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            p = self.read_packet(max(0.0, deadline - time.monotonic()))
            if p.type == ptype:
                return p

    def wait_closed(self, timeout):
        """Reads (and collects) packets until the broker closes the
        connection.  Returns the packets seen; raises WaitTimeout if the
        connection is still open after timeout seconds."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            try:
                seen.append(self.read_packet(max(0.0, deadline - time.monotonic())))
            except Closed:
                return seen
            except socket.timeout:
                raise WaitTimeout(f"connection still open after {timeout}s; got {seen}") from None

    def connect(self, client_id, **kw):
        """Sends CONNECT and returns the CONNACK."""
        self.send(connect_packet(client_id, **kw))
        return self.expect(PT_CONNACK)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------
# The platform, the good device and the per-case guard.


def _small_asan_quarantine(p):
    # Under AddressSanitizer (the test build) freed memory is parked in a
    # quarantine of up to 256 MB before it is reused, so VmRSS of serve
    # would grow by hundreds of MB after any burst whatever the code does.
    # A small quarantine keeps use-after-free detection and makes VmRSS
    # mean something.  Harmless for a build without ASan (and mosquitto).
    opts = p.env.get("ASAN_OPTIONS", "")
    p.env["ASAN_OPTIONS"] = (opts + ":" if opts else "") + "quarantine_size_mb=8"


@pytest.fixture(scope="module")
def plat(module_platform):
    return module_platform("hostile", devices=[GOOD, *OFFENDERS],
                           setup=_small_asan_quarantine)


@pytest.fixture
def good(plat, connected):
    return connected(plat, GOOD)


class GoodTraffic:
    """The well-behaved device: measurements one after another (from a
    background thread between start() and stop()), each of which must be
    answered `ok` within GOOD_REPLY_MAX_S."""

    def __init__(self, dev):
        self.dev = dev
        self.results = []          # (measurement id, status or problem, latency s)
        self._stop = threading.Event()
        self._thread = None

    def one(self):
        mid = unique_id("good")
        try:
            m, lat = self.dev.measure(make_measurement(mid), mid=mid, timeout=GOOD_REPLY_MAX_S)
            status = m.json().get("status")
            if status != "ok":
                status = f"{status}: {m.payload[:200]!r}"
        except WaitTimeout as e:
            status, lat = f"no result: {e}", None
        self.results.append((mid, status, lat))
        return status

    def _run(self):
        while not self._stop.is_set():
            self.one()
            self._stop.wait(0.01)

    def start(self):
        self._thread = threading.Thread(target=self._run, name="good-traffic", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(GOOD_REPLY_MAX_S + 5)

    def count_ok(self):
        return sum(1 for r in self.results if r[1] == "ok")

    def wait_rounds(self, n, timeout=30):
        """Waits until n more measurements have been answered (of any kind)."""
        target = len(self.results) + n
        wait_for(lambda: len(self.results) >= target, timeout,
                 msg=f"{n} more measurements of the good device")

    def summary(self):
        lats = [r[2] for r in self.results if r[2] is not None]
        return (f"{len(self.results)} measurements, {self.count_ok()} ok, "
                f"max latency {max(lats) if lats else float('nan'):.3f}s")


def _pids(plat):
    serve = plat.proc.pid
    assert plat.proc.poll() is None, f"serve exited with {plat.proc.returncode}"
    broker = plat.healthz()["broker_pid"]
    return serve, broker


class Guard:
    def __init__(self, plat, good):
        self.plat = plat
        self.traffic = GoodTraffic(good)
        self.notes = []
        # Allowed VmRSS growth over the case; a case may relax it (saying why).
        self.rss_max_kb = {"serve": RSS_GROWTH_MAX_KB, "mosquitto": RSS_GROWTH_MAX_KB}

    def note(self, text):
        """An observation, printed with the case's summary (pytest -s)."""
        self.notes.append(text)


@pytest.fixture
def guard(plat, good, request):
    """Runs a case between checks: the good device is answered before,
    during (background traffic) and after the case; serve and broker keep
    their pids; their VmRSS grows by less than RSS_GROWTH_MAX_KB."""
    g = Guard(plat, good)
    serve, broker = _pids(plat)
    rss0 = (vm_rss_kb(serve), vm_rss_kb(broker))
    assert g.traffic.one() == "ok", f"before the case: {g.traffic.results}"
    g.traffic.start()
    yield g
    g.traffic.stop()
    during = len(g.traffic.results) - 1
    # After: everything the broker had handed to fleetml before this
    # measurement has been processed once it is answered (one FIFO session,
    # an in-order pipeline).
    assert g.traffic.one() == "ok", f"after the case: {g.traffic.results[-1]}"
    assert plat.proc.poll() is None, f"serve exited with {plat.proc.returncode}"
    serve2, broker2 = _pids(plat)
    assert (serve2, broker2) == (serve, broker), "serve or broker was restarted"
    rss1 = (vm_rss_kb(serve), vm_rss_kb(broker))
    bad = [r for r in g.traffic.results if r[1] != "ok"]
    print(f"\n[{request.node.name}] good device: {g.traffic.summary()} "
          f"({during} during the case); VmRSS serve {rss0[0]}->{rss1[0]} kB, "
          f"mosquitto {rss0[1]}->{rss1[1]} kB")
    for n in g.notes:
        print(f"[{request.node.name}] {n}")
    assert not bad, f"good device not answered ok: {bad[:5]}"
    assert during >= 1, "the good device sent nothing while the case ran"
    for name, a, b in (("serve", rss0[0], rss1[0]), ("mosquitto", rss0[1], rss1[1])):
        assert b - a < g.rss_max_kb[name], f"{name} VmRSS grew from {a} to {b} kB"


def _closed_ok(pkts):
    """The packets the broker sent before closing contain nothing that
    would mean success (no CONNACK 0, PUBACK, SUBACK or PUBLISH), and a
    DISCONNECT, if any, has an error reason code."""
    for p in pkts:
        assert p.type == PT_DISCONNECT or (p.type == PT_CONNACK and p.reason >= 0x80), \
            f"unexpected packet before close: {p}"
        if p.type == PT_DISCONNECT:
            assert p.reason >= 0x80, f"DISCONNECT with reason {p.reason:#x}"


def _reasons(pkts):
    return [f"{'DISCONNECT' if p.type == PT_DISCONNECT else p.type}:{p.reason:#04x}"
            for p in pkts] or ["no packet"]


def _online(plat, device_id):
    """A raw, connected client for device_id (CONNACK success)."""
    c = RawClient(plat, device_id)
    ack = c.connect(device_id)
    assert ack.reason == 0, f"CONNACK {ack}"
    return c


def _subscribe(c, topic_filter):
    c.send(subscribe_packet(topic_filter, packet_id=7))
    ack = c.expect(PT_SUBACK)
    assert ack.reason < 0x80, f"SUBACK {ack.reason:#x} for {topic_filter}"


def _next_publish(c, timeout):
    """The next PUBLISH the client receives as (topic, payload, props
    bytes), or None if the broker sends none within timeout (QoS 0/1 only,
    as the broker delivers results)."""
    try:
        p = c.expect(PT_PUBLISH, timeout)
    except socket.timeout:
        return None
    b = p.body
    tlen = struct.unpack("!H", b[:2])[0]
    topic = b[2:2 + tlen].decode()
    pos = 2 + tlen + (2 if (p.flags >> 1) & 3 else 0)
    plen, pos = parse_vbi(b, pos)
    return topic, b[pos + plen:], b[pos:pos + plen]


# --------------------------------------------------------------------------
# 1. The first packet is not CONNECT.


def test_publish_before_connect(plat, guard):
    dev = "evil-first-publish"
    mid = unique_id("first")
    c = RawClient(plat, dev)           # valid certificate, TLS handshake done
    t0 = time.monotonic()
    c.send(publish_packet(f"fleet/{dev}/measurements", json.dumps(
        make_measurement(mid)).encode()))
    pkts = c.wait_closed(CLOSE_TIMEOUT_S)
    guard.note(f"closed after {c.closed_at - t0:.3f}s ({c.close_reason}), {_reasons(pkts)}")
    _closed_ok(pkts)
    c.close()
    guard.traffic.wait_rounds(2)
    assert plat.count_measurements(dev) == 0



# --------------------------------------------------------------------------
# 2. A malformed Remaining Length (a VBI with more than 4 bytes).


@pytest.mark.parametrize("after_connect", [False, True], ids=["before-connect", "after-connect"])
def test_malformed_remaining_length(plat, guard, after_connect):
    dev = "evil-remlen"
    c = _online(plat, dev) if after_connect else RawClient(plat, dev)
    t0 = time.monotonic()
    # PUBLISH QoS 0, then five continuation bytes: not a valid VBI.
    c.send(bytes([PT_PUBLISH << 4, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]) + b"\x00" * 64)
    pkts = c.wait_closed(CLOSE_TIMEOUT_S)
    guard.note(f"closed after {c.closed_at - t0:.3f}s ({c.close_reason}), {_reasons(pkts)}")
    _closed_ok(pkts)
    c.close()


# --------------------------------------------------------------------------
# 3. Invalid topic names in PUBLISH, after a proper CONNECT.


BAD_TOPICS = {
    # Zero length without a Topic Alias is a protocol error in MQTT 5.
    "zero-length": b"",
    "invalid-utf8": b"fleet/evil-topic/\xff\xfe",
    "overlong-utf8": b"fleet/evil-topic/measurements\xc0\xaf",
    "utf16-surrogate": b"fleet/evil-topic/\xed\xa0\x80",
    "nul": b"fleet/evil-topic/measurements\x00",
}


@pytest.mark.parametrize("name", list(BAD_TOPICS))
def test_invalid_topic(plat, guard, name):
    dev = "evil-topic"
    c = _online(plat, dev)
    mid = unique_id("topic")
    t0 = time.monotonic()
    c.send(publish_packet(None, json.dumps(make_measurement(mid)).encode(),
                          raw_topic=BAD_TOPICS[name]))
    pkts = c.wait_closed(CLOSE_TIMEOUT_S)
    guard.note(f"{name}: closed after {c.closed_at - t0:.3f}s, {_reasons(pkts)}")
    _closed_ok(pkts)
    c.close()
    guard.traffic.wait_rounds(2)
    assert plat.count_measurements(dev, mid) == 0


# --------------------------------------------------------------------------
# 4. A 65 KB topic.

LONG = 65000


@pytest.mark.parametrize("where", ["own-namespace", "measurements-subtopic", "other-device",
                                   "deep-hierarchy"])
def test_long_topic(plat, guard, where):
    dev = "evil-longtopic"
    topic = {
        "own-namespace": f"fleet/{dev}/" + "a" * LONG,
        "measurements-subtopic": f"fleet/{dev}/measurements/" + "a" * LONG,
        "other-device": f"fleet/{GOOD}/" + "a" * LONG,
        "deep-hierarchy": f"fleet/{dev}/" + "a/" * (LONG // 2),
    }[where]
    c = _online(plat, dev)
    mid = unique_id("long")
    t0 = time.monotonic()
    c.send(publish_packet(topic, json.dumps(make_measurement(mid)).encode(), packet_id=9))
    try:
        p = c.expect(PT_PUBACK, CLOSE_TIMEOUT_S)
        outcome = f"PUBACK {p.reason:#04x}"
        # 0x10 No matching subscribers: nobody (fleetml included) gets it.
        # 0x80 and above: refused.  0x00 would mean someone received it.
        assert p.reason == 0x10 or p.reason >= 0x80, outcome
    except Closed:
        outcome = f"closed ({c.close_reason})"
    guard.note(f"{where} ({len(topic)} bytes): {outcome} after {time.monotonic() - t0:.3f}s")
    c.close()
    guard.traffic.wait_rounds(2)
    assert plat.count_measurements(dev, mid) == 0


def test_long_response_topic_and_correlation_data(plat, guard):
    """A valid measurement whose Response Topic (inside the device's own
    namespace) and Correlation Data are 65 KB each: answered once, in the
    device's own namespace, with the correlation data echoed."""
    dev = "evil-longtopic"
    c = _online(plat, dev)
    _subscribe(c, f"fleet/{dev}/results/#")      # also matches fleet/<dev>/results
    rt = f"fleet/{dev}/results/" + "r" * LONG
    corr = os.urandom(LONG)
    mid = unique_id("longrt")
    c.send(publish_packet(f"fleet/{dev}/measurements", json.dumps(make_measurement(mid)).encode(),
                          packet_id=3, properties=prop_str(PROP_RESPONSE_TOPIC, rt)
                          + prop_str(PROP_CORRELATION_DATA, corr)))
    got = _next_publish(c, GOOD_REPLY_MAX_S)
    assert got is not None, "no result for a measurement with a 65 KB response topic"
    topic, payload, pbytes = got
    doc = json.loads(payload)
    assert doc["id"] == mid and doc["status"] == "ok", doc
    assert topic in (rt, f"fleet/{dev}/results"), topic[:100]
    assert prop_str(PROP_CORRELATION_DATA, corr) in pbytes, "correlation data not echoed"
    guard.note(f"result on {'the response topic' if topic == rt else topic!r} "
               f"({len(topic)} bytes), correlation data echoed")
    assert _next_publish(c, 0.5) is None, "a second result"
    c.close()


# --------------------------------------------------------------------------
# 5. Oversize payloads.


def test_payload_just_over_limit_answered(plat, guard):
    dev = "evil-oversize"
    c = _online(plat, dev)
    _subscribe(c, f"fleet/{dev}/results")
    mid = unique_id("big")
    head = b'{"id":"%s","pad":"' % mid.encode()
    payload = head + b"a" * (MAX_PAYLOAD + 1 - len(head) - 2) + b'"}'
    assert len(payload) == MAX_PAYLOAD + 1
    c.send(publish_packet(f"fleet/{dev}/measurements", payload))
    got = _next_publish(c, GOOD_REPLY_MAX_S)
    assert got is not None, "no result for a 131073-byte payload"
    doc = json.loads(got[1])
    assert doc["status"] == "error" and doc["error"]["code"] == "payload_too_large", doc
    guard.note(f"{len(payload)} bytes: {doc['error']}")


def _packet_of_size(topic, total):
    """A QoS 1 PUBLISH of exactly `total` bytes (Remaining Length VBI of 3
    bytes, i.e. total between 16 KiB and 2 MiB)."""
    overhead = len(publish_packet(topic, b"a" * 100000)) - 100000
    pk = publish_packet(topic, b"a" * (total - overhead))
    assert len(pk) == total
    return pk


def test_packet_at_limit_answered(plat, guard):
    """A packet of exactly broker.max_packet_size bytes is still let
    through; the payload is over 128 KiB, so it is answered."""
    dev = "evil-oversize"
    c = _online(plat, dev)
    _subscribe(c, f"fleet/{dev}/results")
    c.send(_packet_of_size(f"fleet/{dev}/measurements", MAX_PACKET))
    p = c.expect(PT_PUBACK, CLOSE_TIMEOUT_S)
    assert p.reason < 0x80, p
    got = _next_publish(c, GOOD_REPLY_MAX_S)
    assert got is not None and json.loads(got[1])["error"]["code"] == "payload_too_large", got


# Mosquitto 2.0.11 compares max_packet_size with Remaining Length + 1, so a
# packet up to 3 bytes longer than the limit (the Remaining Length's own
# bytes) still passes; MAX_PACKET + 4 is the first refused size.
@pytest.mark.parametrize("total", [MAX_PACKET + 4, 300_000, 2_000_000])
def test_packet_over_limit_closed(plat, guard, total):
    dev = "evil-oversize"
    c = _online(plat, dev)
    _subscribe(c, f"fleet/{dev}/results")
    t0 = time.monotonic()
    try:
        c.send(_packet_of_size(f"fleet/{dev}/measurements", total))
    except (ssl.SSLError, OSError):
        pass    # the broker may close before it has read everything
    pkts = c.wait_closed(CLOSE_TIMEOUT_S)
    guard.note(f"{total} bytes: closed after {c.closed_at - t0:.3f}s, {_reasons(pkts)}")
    assert [p.type for p in pkts] in ([], [PT_DISCONNECT]), pkts
    if pkts:
        assert pkts[0].reason == 0x95, f"DISCONNECT reason {pkts[0].reason:#x}, expected 0x95"
    c.close()


# --------------------------------------------------------------------------
# 6. 10,000 user properties in one PUBLISH.
#
# MQTT 5 sets no limit on the number of user properties (only the packet
# size bounds them). The fleetml broker plugin refuses a device message
# with more than 64 properties (PUBACK 0x87) because handling long lists
# costs the broker's only thread; what must hold is that nothing chokes and
# a refused message is never answered or stored.


@pytest.mark.parametrize("prefix", ["k", "fleetml-forged-"])
def test_ten_thousand_user_properties(plat, guard, prefix):
    dev = "evil-props"
    c = _online(plat, dev)
    _subscribe(c, f"fleet/{dev}/results")
    mid = unique_id("props")
    pr = b"".join(prop_pair(f"{prefix}{i}", "v") for i in range(10_000))
    t0 = time.monotonic()
    c.send(publish_packet(f"fleet/{dev}/measurements", json.dumps(make_measurement(mid)).encode(),
                          properties=pr))
    try:
        ack = c.expect(PT_PUBACK, CLOSE_TIMEOUT_S)
    except Closed:
        guard.note(f"prefix {prefix!r}: connection closed ({c.close_reason})")
        return
    t_ack = time.monotonic() - t0
    got = _next_publish(c, GOOD_REPLY_MAX_S) if ack.reason < 0x80 else None
    outcome = json.loads(got[1]) if got else None
    guard.note(f"prefix {prefix!r} ({len(pr)} property bytes): PUBACK {ack.reason:#04x} "
               f"after {t_ack:.3f}s, result {outcome and outcome['status']} after "
               f"{time.monotonic() - t0:.3f}s")
    assert ack.reason == 0x87, f"expected the plugin to refuse it, PUBACK {ack.reason:#04x}"
    assert outcome is None
    assert plat.query("SELECT count(*) FROM measurements WHERE measurement_id = ?", mid)[0][0] == 0
    c.close()


def test_forged_property_among_many_does_not_stall_broker(plat, good):
    """One forged fleetml-* property plus as many tiny user properties as
    fit in the packet limit: stripping them must not stall the broker (its
    one thread serves every device) for more than a second, and the good
    device must still be answered within GOOD_REPLY_MAX_S meanwhile."""
    dev = "evil-props"
    serve, broker = _pids(plat)
    traffic = GoodTraffic(good)
    assert traffic.one() == "ok"
    c = _online(plat, dev)
    body = json.dumps(make_measurement(unique_id("stall"))).encode()
    n = (MAX_PACKET - len(body) - 512) // 6          # name "k", empty value: 6 bytes
    pr = prop_pair("fleetml-cert-serial", "00") + prop_pair("k", "") * n
    traffic.start()
    try:
        t0 = time.monotonic()
        c.send(publish_packet(f"fleet/{dev}/measurements", body, properties=pr))
        ack = c.expect(PT_PUBACK, 60)
        stall = time.monotonic() - t0
        traffic.wait_rounds(2)
    finally:
        traffic.stop()
        c.close()
    print(f"\n[stall] {n} user properties + 1 forged: PUBACK {ack.reason:#04x} after "
          f"{stall:.3f}s; good device: {traffic.summary()}")
    assert traffic.one() == "ok"
    assert _pids(plat) == (serve, broker)
    assert stall < 1.0, f"the broker spent {stall:.1f}s on one {MAX_PACKET}-byte PUBLISH"
    bad = [r for r in traffic.results if r[1] != "ok"]
    assert not bad, f"good device not answered ok meanwhile: {bad}"


# --------------------------------------------------------------------------
# 7. A flood of QoS 1 publishes whose PUBACKs are never read.

FLOOD = 20_000


def _flood(c, dev, n):
    """Writes n QoS 1 PUBLISHes as fast as the socket takes them and never
    reads (so every PUBACK stays unread).  Returns (sent, seconds, error)."""
    t0 = time.monotonic()
    sent, err = 0, None
    try:
        for i in range(n):
            c.send(publish_packet(f"fleet/{dev}/measurements", b'{"id":"flood-%d"}' % i,
                                  packet_id=i % 0xFFFF + 1))
            sent += 1
    except (ssl.SSLError, OSError) as e:
        err = repr(e)
    return sent, time.monotonic() - t0, err


def _settled_count(plat, dev, timeout=60):
    """The device's quarantine row count once it has not changed over
    three polls 0.2 s apart with fleetml's pipeline queue empty."""
    hist = []

    def settled():
        depth = metric_value(plat.metrics(), "fleetml_pipeline_queue_depth")
        n = plat.query("SELECT count(*) FROM quarantine WHERE device_id = ?", dev)[0][0]
        hist.append((n, depth))
        last = hist[-3:]
        return (len(last) == 3 and len({x[0] for x in last}) == 1
                and all(x[1] == 0 for x in last) and (n,))

    return wait_for(settled, timeout, interval=0.2, msg="the flood to be processed")[0]


def test_qos1_flood_without_reading_pubacks(plat, guard):
    """Two floods of FLOOD small publishes (payload `{"id":...}`, answered
    missing_field and quarantined).  The good device keeps being answered
    during both; the second flood must not add memory the first did not
    (bounded, not merely slow growth).  The first flood raises serve's
    high-water mark by up to ~45 MB under ASan (its allocator, redzones and
    8 MB quarantine; ~6 MB without ASan), so the case allows 100 MB
    overall for serve."""
    dev = "evil-flood"
    guard.rss_max_kb["serve"] = 2 * RSS_GROWTH_MAX_KB
    serve, broker = _pids(plat)
    base = plat.query("SELECT count(*) FROM quarantine WHERE device_id = ?", dev)[0][0]
    rss = []
    for rnd in (1, 2):
        c = _online(plat, dev)
        box = {}
        th = threading.Thread(target=lambda: box.update(r=_flood(c, dev, FLOOD)),
                              name="flood", daemon=True)
        th.start()
        th.join(60)
        assert not th.is_alive(), "flood writer blocked for 60 s"
        sent, secs, err = box["r"]
        # sendall() returns once the kernel has the bytes, and the broker
        # reads its sockets in turns, so the flood is processed when fleetml's
        # queue is empty and the quarantine count has stopped moving.
        n = len(guard.traffic.results)
        guard.traffic.wait_rounds(2)
        assert all(r[1] == "ok" for r in guard.traffic.results[n:]), guard.traffic.results[n:]
        reached = _settled_count(plat, dev) - base
        base += reached
        rss.append((vm_rss_kb(serve), vm_rss_kb(broker)))
        guard.note(f"flood {rnd}: {sent} publishes written in {secs:.2f}s"
                   f"{' (' + err + ')' if err else ''}; {reached} reached fleetml; "
                   f"VmRSS serve {rss[-1][0]} kB, mosquitto {rss[-1][1]} kB")
        c.close()
    log = (plat.data / "broker" / "mosquitto.log").read_text(errors="replace")
    if "Outgoing messages are being dropped for client fleetml-service" in log:
        guard.note("the broker dropped messages for fleetml-service (max_queued_messages)")
    for i, name in enumerate(("serve", "mosquitto")):
        assert rss[1][i] - rss[0][i] < 25 * 1024, \
            f"{name} VmRSS kept growing: {rss[0][i]} -> {rss[1][i]} kB over the second flood"


# --------------------------------------------------------------------------
# 8 and 9. Connections that never send CONNECT / never start TLS.
#
# The generated mosquitto.conf sets no timeout for them, and mosquitto
# 2.0.11 has no option for one: a new connection gets the default keepalive
# of 60 s before CONNECT, so it is closed when nothing has arrived for
# 1.5 x 60 s = 90 s (its keepalive check; observed: 95 s for all three
# kinds).  That is too long for `make
# test`; the default run checks that such connections do not disturb
# anybody, and FM_HOSTILE_SLOW=1 also waits for the broker to close them.

IDLE_CLOSE_MAX_S = 110.0


def _idle_connections(plat, kind, n):
    out = []
    for _ in range(n):
        if kind == "tls-no-connect":
            out.append(RawClient(plat, "evil-idle"))      # handshake done, then silence
        elif kind == "tcp-no-tls":
            out.append(RawClient(plat, tls=False))        # not even a ClientHello
        else:                                             # half a ClientHello
            c = RawClient(plat, tls=False)
            c.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            out.append(c)
    return out


def _still_open(c):
    try:
        c.read_packet(0.01)
        return True
    except socket.timeout:
        return True
    except Closed:
        return False


@pytest.mark.parametrize("kind", ["tls-no-connect", "tcp-no-tls", "partial-client-hello"])
def test_idle_connections(plat, guard, kind):
    conns = _idle_connections(plat, kind, 50)
    t0 = time.monotonic()
    try:
        guard.traffic.wait_rounds(10)
        still = sum(_still_open(c) for c in conns)
        guard.note(f"50 {kind} connections: {still} still open after "
                   f"{time.monotonic() - t0:.1f}s of good traffic")
    finally:
        for c in conns:
            c.close()


@pytest.mark.skipif(not os.environ.get("FM_HOSTILE_SLOW"), reason="waits ~90 s; FM_HOSTILE_SLOW=1")
def test_idle_connections_closed_by_broker(plat):
    t0 = time.monotonic()
    conns = {k: _idle_connections(plat, k, 2)
             for k in ("tls-no-connect", "tcp-no-tls", "partial-client-hello")}
    times = {}
    try:
        for kind, cs in conns.items():
            for c in cs:
                c.wait_closed(max(1.0, IDLE_CLOSE_MAX_S - (time.monotonic() - t0)))
                times.setdefault(kind, []).append(round(c.closed_at - t0, 1))
    finally:
        print(f"\n[idle] closed after (s): {times}")
        for cs in conns.values():
            for c in cs:
                c.close()
    assert _pids(plat)


# --------------------------------------------------------------------------
# 10. A client without a certificate hammering the listener.


def _nocert_attempt(plat):
    """One connection attempt without a client certificate.  Returns how it
    was refused; fails if the broker ever answers CONNACK success."""
    try:
        c = RawClient(plat, cert=False)
    except (ssl.SSLError, OSError) as e:
        return f"handshake: {type(e).__name__}"
    try:
        c.send(connect_packet("nocert"))
        p = c.read_packet(CLOSE_TIMEOUT_S)
        assert not (p.type == PT_CONNACK and p.reason < 0x80), f"accepted without certificate: {p}"
        return f"packet {p}"
    except (ssl.SSLError, OSError) as e:
        return f"after handshake: {type(e).__name__}"
    except Closed:
        return f"closed: {c.close_reason.split('(')[0]}"
    finally:
        c.close()


def test_no_certificate_hammering(plat, guard):
    attempts, threads = 200, 4
    outcomes = []
    lock = threading.Lock()

    def worker(k):
        for _ in range(k):
            r = _nocert_attempt(plat)
            with lock:
                outcomes.append(r)

    t0 = time.monotonic()
    ths = [threading.Thread(target=worker, args=(attempts // threads,)) for _ in range(threads)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(60)
    elapsed = time.monotonic() - t0
    assert len(outcomes) == attempts, f"{len(outcomes)} of {attempts} attempts finished"
    kinds = {}
    for o in outcomes:
        kinds[o] = kinds.get(o, 0) + 1
    guard.note(f"{attempts} attempts in {elapsed:.2f}s, all refused: {kinds}")
    assert all(not o.startswith("packet") for o in outcomes), kinds


# --------------------------------------------------------------------------
# 7b. A flood of large payloads (last in the module: it leaves a backlog).
#
# Each payload is just under the 128 KiB limit.  The broker plugin admits
# a device's publishes up to pipeline.device_rate messages and
# pipeline.device_bytes_rate bytes per second (with bursts) and refuses the
# rest itself, so the flood never queues on the service's connection ahead
# of the good device's measurement; what it admits, fleetml parses and
# quarantines.

BIG_FLOOD, BIG_SIZE = 1500, 131000


def test_large_payload_flood(plat, good):
    dev = "evil-flood"
    serve, broker = _pids(plat)
    traffic = GoodTraffic(good)
    assert traffic.one() == "ok"
    rss0 = vm_rss_kb(serve)
    c = _online(plat, dev)
    t0 = time.monotonic()
    sent = 0
    try:
        for i in range(BIG_FLOOD):
            body = b'{"id":"big-flood-%d","pad":"' % i
            c.send(publish_packet(f"fleet/{dev}/measurements",
                                  body + b"a" * (BIG_SIZE - len(body) - 2) + b'"}',
                                  packet_id=i % 0xFFFF + 1), timeout=60)
            sent += 1
    except (ssl.SSLError, OSError):
        pass
    t_flood = time.monotonic() - t0
    # Straight after the burst: is the good device answered in time?
    first = traffic.one()
    rss_peak = vm_rss_kb(serve)
    lat_first = traffic.results[-1][2]
    # Let the backlog drain before anything else runs (condition: a result
    # for a measurement sent now, behind the whole backlog).
    mid = unique_id("drain")
    t1 = time.monotonic()
    good.measure(make_measurement(mid), mid=mid, timeout=300)
    drain = time.monotonic() - t1
    c.close()
    print(f"\n[big-flood] {sent} x {BIG_SIZE} B written in {t_flood:.2f}s; good device's "
          f"next result: {first!r:.60} after {lat_first}; backlog drained {drain:.1f}s later; "
          f"serve VmRSS {rss0} -> {rss_peak} kB")
    assert _pids(plat) == (serve, broker)
    assert first == "ok", f"good device not answered within {GOOD_REPLY_MAX_S}s after the flood"
    assert rss_peak - rss0 < RSS_GROWTH_MAX_KB, f"serve VmRSS grew from {rss0} to {rss_peak} kB"
