"""The HTTP edge against hostile clients (docs/operations.md, "The HTTP
edge"): request framing per RFC 9112 (an ambiguous request is answered 400
with Connection: close and nothing after it on the connection is ever
processed), routing on the path as sent, slow clients cut without locking
others out, and the operations endpoints on their own listener."""

import json
import os
import re
import shutil
import select
import signal
import socket
import subprocess
import threading
import time

import pytest

from api_client import Api, Users
from helpers import free_ports, metric_value, wait_for

DEVICE = "edge-dev"

# A request the server must never answer when it hides behind a refused
# one: any answer to it shows up as a second status line or as its body.
SMUGGLED = b"GET /api/v1/me HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def env(module_platform):
    p = module_platform("edge", devices=[DEVICE], sets={"http.header_timeout_s": "3"})
    users = Users(Api(p))
    users.add("admin", p.admin_password)
    return p, users.token("admin")


def exchange(port, data, timeout=5.0, source=None):
    """Sends data, reads until the server closes or timeout. Returns
    (bytes received, closed_by_server)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                 source_address=(source, 0) if source else None)
    buf = b""
    closed = False
    deadline = time.monotonic() + timeout
    try:
        s.sendall(data)
        while time.monotonic() < deadline:
            s.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                d = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not d:
                closed = True
                break
            buf += d
    finally:
        s.close()
    return buf, closed


def status_lines(buf):
    return re.findall(rb"HTTP/1\.[01] (\d{3}) ", buf)


def head_of(buf):
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    hdrs = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(b":")
        hdrs[k.strip().lower().decode()] = v.strip().decode()
    return int(lines[0].split()[1]), hdrs, body


LOGIN = b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"

# Requests fleetml itself refuses: one clean 400 answer, then the close.
FRAMING = {
    "content-length and chunked": LOGIN + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"
                                          b"\r\n0\r\n\r\n",
    "two content-lengths": LOGIN + b"Content-Length: 2\r\nContent-Length: 40\r\n\r\n{}",
    "unknown coding": LOGIN + b"Transfer-Encoding: xchunked\r\n\r\n",
    "coding list": LOGIN + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "two codings": LOGIN + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"0\r\n\r\n",
    "coding on HTTP/1.0": b"POST /api/v1/auth/login HTTP/1.0\r\nHost: x\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "space before colon": b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length : 0\r\n\r\n",
    "no host": b"GET /healthz HTTP/1.1\r\nAccept: */*\r\n\r\n",
    "two hosts": b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "control byte in value": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n",
    "space in target": b"GET /api/v1/me /x HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad escape": b"GET /api/v1/devices/%zz HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(FRAMING))
def test_ambiguous_framing_is_refused_and_closed(env, case):
    p, _ = env
    buf, closed = exchange(p.http_port, FRAMING[case] + SMUGGLED)
    assert status_lines(buf) == [b"400"], (case, buf[:600])
    status, hdrs, body = head_of(buf)
    assert hdrs.get("connection", "").lower() == "close", (case, hdrs)
    assert json.loads(body)["error"]["code"] == "bad_request", body
    assert closed, f"{case}: the connection stayed open"


@pytest.mark.parametrize("value", [b"1e20", b"-1", b"+2", b"0x10", b"99999999999999999999999"])
def test_malformed_content_length_closes(env, value):
    # libmicrohttpd 0.9.75 refuses these itself, before fleetml sees the
    # request (docs/operations.md says how its answer looks); what must
    # hold is that it is refused, the connection closes and the request
    # behind it is never answered.
    p, _ = env
    buf, closed = exchange(p.http_port, LOGIN + b"Content-Length: " + value + b"\r\n\r\n"
                           + SMUGGLED)
    codes = set(status_lines(buf))
    assert codes and codes <= {b"400", b"413"}, buf[:400]
    assert b"unauthorized" not in buf, "the smuggled request was answered"
    assert closed


def test_pipelined_requests_still_work(env):
    # The edge refuses ambiguity, not keep-alive: two clean requests on one
    # connection are both answered.
    p, _ = env
    one = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    buf, _ = exchange(p.http_port, one + one + b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                      b"Connection: close\r\n\r\n")
    assert status_lines(buf) == [b"200"] * 3, buf[:600]


def test_routes_match_the_path_as_sent(env):
    p, tok = env
    api = Api(p)
    assert api.request("GET", f"/devices/{DEVICE}", token=tok).status == 200
    # An escaped '/' never joins two segments of a route.
    assert api.request("GET", "/api/v1%2fusers", token=tok, api=False).status == 404
    assert api.request("GET", "/users%2F", token=tok).status == 404
    for bad in (f"{DEVICE}%2fmeasurements", f"{DEVICE}%2Fmeasurements", f"{DEVICE}%00xyz",
                f"{DEVICE}%5cx", f"{DEVICE}%0a", "%2e%2e", ".", ".."):
        r = api.request("GET", f"/devices/{bad}", token=tok)
        assert r.status == 400, (bad, r)
        assert r.json()["error"]["code"] == "invalid_request", r
        r = api.request("GET", f"/devices/{bad}/measurements", token=tok)
        assert r.status == 400, (bad, r)
    # A parameter escaped without need still names the same object.
    enc = "".join(f"%{ord(c):02X}" for c in DEVICE)
    r = api.request("GET", f"/devices/{enc}", token=tok)
    assert r.status == 200 and r.json()["id"] == DEVICE, r
    # Built-in paths match exactly, on both listeners.
    for port in (p.http_port, p.ops_port):
        for path in ("/metrics%00.txt", "/metric%73", "/healthz%2f", "//healthz"):
            buf, _ = exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close"
                              f"\r\n\r\n".encode())
            assert status_lines(buf) == [b"404"], (port, path, buf[:300])


def test_operations_endpoints_are_on_their_own_listener(env):
    p, tok = env
    for path in ("/metrics", "/readyz", "/openapi.yaml"):
        st, _ = p.api_http(path)
        assert st == 404, (path, st)
        st, body = p.http(path)
        assert st == 200, (path, st, body[:200])
    st, body = p.api_http("/healthz")
    assert st == 200 and json.loads(body) == {"status": "ok"}, body
    st, body = p.http("/healthz")
    doc = json.loads(body)
    assert st == 200 and doc["node"] and doc["broker_pid"] > 0, doc
    assert "fleetml_http_refused_total" in p.metrics()


def trickle(socks, stop, byte):
    """A thread sending byte on every socket of socks once a second until
    stop is set (a socket that fails drops out), then closing them."""
    def run():
        while not stop.is_set():
            for s in list(socks):
                try:
                    s.send(byte)
                except OSError:
                    socks.remove(s)
            stop.wait(1.0)
        for s in socks:
            s.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def slow_clients(port, n, stop, source="127.0.0.1"):
    """n connections that each send one byte of a request head per second
    until stop is set. Returns the list of sockets (closed ones drop out)."""
    socks = []
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2,
                                         source_address=(source, 0))
            s.send(b"G")
            socks.append(s)
        except OSError:
            pass  # over the per-address cap: refused at once, as it should be

    return socks, trickle(socks, stop, b"E")


def timed_get(port, source, extra=b""):
    t0 = time.monotonic()
    buf, _ = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + extra
                      + b"\r\n", timeout=5, source=source)
    return status_lines(buf)[:1] == [b"200"], time.monotonic() - t0


def test_slow_clients_are_cut_and_lock_nobody_else_out(env):
    p, _ = env
    cut0 = metric_value(p.metrics(), "fleetml_http_slow_closed_total") or 0
    stop = threading.Event()
    socks, t = slow_clients(p.http_port, 70, stop)
    try:
        assert len(socks) >= 60, len(socks)
        worst = 0.0
        t0 = time.monotonic()
        # Another address is answered within 1 s throughout...
        while socks and time.monotonic() - t0 < 30:
            ok, took = timed_get(p.http_port, "127.0.0.2")
            assert ok, "a normal client was not answered"
            worst = max(worst, took)
            time.sleep(0.3)
        assert worst < 1.0, f"normal client took {worst:.2f}s"
        # ...and the trickling connections are all cut (3 s head deadline),
        # long before libmicrohttpd's idle timeout would have.
        assert not socks, f"{len(socks)} slow connections still open after 30 s"
        assert time.monotonic() - t0 < 20
    finally:
        stop.set()
        t.join(5)
    # Their own address is served again once they are gone.
    assert timed_get(p.http_port, "127.0.0.1")[0]
    cut = metric_value(p.metrics(), "fleetml_http_slow_closed_total")
    assert cut - cut0 >= 60, (cut0, cut)


def test_behind_a_proxy_the_cap_is_per_forwarded_address(module_platform):
    # Behind a trusted proxy every connection comes from the proxy: 70
    # slow ones must not keep the proxy's other requests out.
    p = module_platform("edgeproxy", sets={"http.trusted_proxies": "127.0.0.1",
                                           "http.header_timeout_s": "3"})
    stop = threading.Event()
    socks, t = slow_clients(p.http_port, 70, stop)
    try:
        assert len(socks) == 70, "the per-connection cap is still on behind a proxy"
        worst = 0.0
        for _ in range(8):
            ok, took = timed_get(p.http_port, "127.0.0.1", b"X-Forwarded-For: 198.51.100.4\r\n")
            assert ok
            worst = max(worst, took)
            time.sleep(0.25)
        assert worst < 1.0, f"normal client behind the proxy took {worst:.2f}s"
        wait_for(lambda: not socks, 20, interval=0.2, msg="the slow connections to be cut")
    finally:
        stop.set()
        t.join(5)


def slow_request(port, xff=None):
    """A connection whose request head is whole and whose body has begun."""
    head = (b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 4000\r\n"
            + (b"X-Forwarded-For: " + xff.encode() + b"\r\n" if xff else b"") + b"\r\n{")
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    s.send(head)
    return s


def slow_bodies(port, n, stop, xff=None):
    """n requests whose head is whole and whose body then trickles one byte
    a second; returns (sockets still open, the trickling thread)."""
    socks = [slow_request(port, xff) for _ in range(n)]

    return socks, trickle(socks, stop, b" ")


def test_a_body_slower_than_the_minimum_rate_is_cut(env):
    """A whole head and then a body at 1 byte/s: cut once the body falls
    below http.body_min_rate (after its grace), never answered."""
    p, _ = env
    cut0 = metric_value(p.metrics(), "fleetml_http_slow_closed_total") or 0
    stop = threading.Event()
    socks, t = slow_bodies(p.http_port, 3, stop)
    try:
        wait_for(lambda: not socks, 30, interval=0.2, msg="the slow bodies to be cut")
    finally:
        stop.set()
        t.join(5)
    assert metric_value(p.metrics(), "fleetml_http_slow_closed_total") - cut0 >= 3
    assert timed_get(p.http_port, "127.0.0.1")[0]


def test_behind_a_proxy_requests_in_flight_are_capped_per_client(module_platform):
    """Behind a trusted proxy the cap counts requests in flight per
    forwarded address: one client over it gets 429, another is served."""
    p = module_platform("edgecap", sets={"http.trusted_proxies": "127.0.0.1",
                                         "http.per_address_limit": "3",
                                         "http.body_min_rate": "0"})
    stop = threading.Event()
    socks, t = slow_bodies(p.http_port, 3, stop, xff="198.51.100.7")
    try:
        def answer(xff):
            buf, _ = exchange(p.http_port, b"GET /api/v1/me HTTP/1.1\r\nHost: x\r\n"
                              b"X-Forwarded-For: " + xff + b"\r\nConnection: close\r\n\r\n")
            return status_lines(buf)[:1]

        def refill():
            """A probe can reach the server before a slow head does, take
            the third slot for a moment and get that slow request refused:
            a slow request the server has answered is opened again."""
            for s in list(socks):
                if select.select([s], [], [], 0)[0]:
                    socks.remove(s)
                    s.close()
                    socks.append(slow_request(p.http_port, "198.51.100.7"))

        def fourth_refused():
            refill()
            return answer(b"198.51.100.7") == [b"429"]
        # The three slow requests hold the client's slots (once each head is in).
        wait_for(fourth_refused, 30, interval=0.2, msg="the fourth request of one client refused")
        assert answer(b"198.51.100.8") == [b"401"]  # another client: routed (no token)
        assert metric_value(p.metrics(), "fleetml_http_refused_total",
                            reason="per_address") >= 1
    finally:
        stop.set()
        t.join(5)
    # Once they are gone the client is served again.
    wait_for(lambda: status_lines(exchange(
        p.http_port, b"GET /api/v1/me HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.7"
        b"\r\nConnection: close\r\n\r\n")[0])[:1] == [b"401"], 20, interval=0.2,
        msg="the client served again")


# --------------------------------------------------------------------------
# Behind HAProxy, as docs/operations.md deploys it: what libmicrohttpd 0.9.75
# cannot refuse (bare LF line ends) or answers clumsily (a malformed
# Content-Length) never reaches fleetml in an ambiguous form.

HAPROXY_CFG = """
global
    maxconn 256
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
frontend api
    bind 127.0.0.1:{front}
    option forwardfor
    http-request deny if {{ path_reg [^[:graph:]] }}
    default_backend fleetml
backend fleetml
    server n1 127.0.0.1:{back}
"""


@pytest.fixture(scope="module")
def haproxy(module_platform, tmp_path_factory):
    exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert os.path.exists(exe), "haproxy is missing: scripts/install-deps installs it"
    p = module_platform("edgehap", sets={"http.trusted_proxies": "127.0.0.1"})
    (front,) = free_ports(1)
    cfg = tmp_path_factory.mktemp("haproxy") / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(front=front, back=p.http_port))
    proc = subprocess.Popen([exe, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)

    def up():
        assert proc.poll() is None, proc.stderr.read().decode(errors="replace")
        try:
            socket.create_connection(("127.0.0.1", front), timeout=1).close()
            return True
        except OSError:
            return False
    wait_for(up, 15, interval=0.05, msg="haproxy to listen")
    yield p, front
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.parametrize("value", [b"1e20", b"-1", b"+2", b"99999999999999999999999"])
def test_behind_haproxy_malformed_length_gets_one_clean_answer(haproxy, value):
    p, front = haproxy
    buf, closed = exchange(front, LOGIN + b"Content-Length: " + value + b"\r\n\r\n" + SMUGGLED)
    assert status_lines(buf) == [b"400"], buf[:400]
    assert b"unauthorized" not in buf and closed


def test_behind_haproxy_length_and_chunked_never_smuggle(haproxy):
    p, front = haproxy
    buf, closed = exchange(front, FRAMING["content-length and chunked"] + SMUGGLED)
    # HAProxy keeps chunked, drops the length, answers once and closes.
    assert len(status_lines(buf)) == 1 and b"unauthorized" not in buf and closed, buf[:600]


def test_behind_haproxy_bare_lf_reaches_fleetml_as_crlf(haproxy):
    p, front = haproxy
    before = metric_value(p.metrics(), "fleetml_http_refused_total", reason="framing") or 0
    buf, _ = exchange(front, b"GET /healthz HTTP/1.1\nHost: x\nConnection: close\n\n")
    assert status_lines(buf) == [b"200"], buf[:300]
    status, _, body = head_of(buf)
    assert json.loads(body) == {"status": "ok"}
    after = metric_value(p.metrics(), "fleetml_http_refused_total", reason="framing") or 0
    assert after == before
