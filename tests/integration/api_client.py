"""A small client for the HTTP API v1 (/api/v1), standard library only.

Black-box: it speaks HTTP to the port the fixture gave the platform and
uses the command line to create users.  Nothing of fleetml is imported.
See docs/openapi.yaml for the contract these helpers check.
"""

import base64
import gzip
import http.client
import json
import re
import select
import socket
import time
from datetime import datetime, timezone

from helpers import TENANT, wait_for

API = "/api/v1"

# Every API response carries these (HTTP only, so no HSTS here).
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}

RFC3339_MS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

# A password that passes the policy (>= 12 characters, not common, not the
# username); each user gets its own by appending the username's reverse.
def strong_password(username):
    return f"Qx7!vR2#tL9m-{username[::-1]}-Zp4"


# --------------------------------------------------------------------------
# Responses


class Resp:
    def __init__(self, status, headers, body, elapsed):
        self.status = status
        self.headers = headers      # http.client.HTTPMessage (case-insensitive)
        self.body = body            # bytes
        self.elapsed = elapsed      # seconds
        self._json = None

    @property
    def text(self):
        return self.body.decode(errors="replace")

    def json(self):
        if self._json is None:
            self._json = json.loads(self.body)
        return self._json

    def header(self, name):
        return self.headers.get(name) if self.headers is not None else None

    def __repr__(self):
        return f"<{self.status} {self.text[:400]!r}>"


def is_rfc3339_ms(s):
    return isinstance(s, str) and bool(RFC3339_MS_RE.match(s))


def parse_time(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def ms_of(s):
    """Milliseconds since the epoch of an RFC 3339 string."""
    return int(round(parse_time(s).timestamp() * 1000))


def rfc3339_of_ms(ms):
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def check_error(r, status, code=None):
    """Asserts r is an error response of the contract's shape:
    {"error": {"code": code, "message": "<sentence>"}} with the status."""
    assert r.status == status, f"expected {status} {code or ''}, got {r!r}"
    try:
        doc = r.json()
    except ValueError:
        raise AssertionError(f"{status} error body is not JSON: {r.body[:300]!r}") from None
    err = doc.get("error") if isinstance(doc, dict) else None
    assert isinstance(err, dict), f"no error object in {doc}"
    assert isinstance(err.get("code"), str) and err["code"], doc
    assert isinstance(err.get("message"), str) and err["message"].strip(), doc
    if code is not None:
        assert err["code"] == code, f"expected error code {code!r}, got {doc}"
    ctype = r.header("Content-Type") or ""
    assert ctype.split(";")[0].strip().lower() == "application/json", (
        f"error Content-Type {ctype!r}")
    return err


def check_unauthorized(r, code="unauthorized"):
    check_error(r, 401, code)
    if code == "unauthorized":
        www = r.header("WWW-Authenticate") or ""
        assert www.split()[:1] == ["Bearer"], f"WWW-Authenticate {www!r} on 401 {r!r}"


def check_security_headers(r):
    missing = {}
    for k, v in SECURITY_HEADERS.items():
        got = r.header(k)
        if got is None or got.strip() != v:
            missing[k] = got
    assert not missing, f"security headers wrong on {r.status}: {missing} (want {SECURITY_HEADERS})"


# --------------------------------------------------------------------------
# The client


class Api:
    """HTTP client bound to one platform's API port."""

    def __init__(self, platform, host="127.0.0.1", source=None):
        """source: local address to connect from (another 127.0.0.x gives
        a distinct client address for the per-address sign-in throttle)."""
        self.platform = platform
        self.host = host
        self.port = platform.http_port
        self.source = source

    def request(self, method, path, body=None, token=None, headers=None, raw=None,
                content_type="application/json", timeout=10, api=True):
        """body: JSON-encoded when given; raw: bytes sent as is.  path is
        relative to /api/v1 unless api=False."""
        url = (API + path) if api else path
        hdrs = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
        elif raw is not None:
            data = raw
        if data is not None and content_type is not None:
            hdrs["Content-Type"] = content_type
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        hdrs.update(headers or {})
        conn = http.client.HTTPConnection(
            self.host, self.port, timeout=timeout,
            source_address=(self.source, 0) if self.source else None)
        t0 = time.monotonic()
        try:
            conn.request(method, url, body=data, headers=hdrs)
            r = conn.getresponse()
            payload = r.read()
            return Resp(r.status, r.headers, payload, time.monotonic() - t0)
        finally:
            conn.close()

    def get(self, path, token=None, **kw):
        return self.request("GET", path, token=token, **kw)

    def post(self, path, body=None, token=None, **kw):
        return self.request("POST", path, body=body, token=token, **kw)

    def put(self, path, body=None, token=None, **kw):
        return self.request("PUT", path, body=body, token=token, **kw)

    def patch(self, path, body=None, token=None, **kw):
        return self.request("PATCH", path, body=body, token=token, **kw)

    # -- auth -------------------------------------------------------------

    def login_resp(self, username, password, tenant=TENANT):
        return self.post("/auth/login", {"tenant": tenant, "username": username,
                                         "password": password})

    def login(self, username, password, tenant=TENANT):
        """Signs in and returns the token document (asserting its shape)."""
        r = self.login_resp(username, password, tenant)
        assert r.status == 200, f"login {tenant}/{username}: {r!r}"
        doc = r.json()
        check_token_doc(doc)
        return doc

    def refresh(self, refresh_token):
        return self.post("/auth/refresh", {"refresh_token": refresh_token})

    def logout(self, refresh_token):
        return self.post("/auth/logout", {"refresh_token": refresh_token})

    # -- helpers ----------------------------------------------------------

    def ok(self, method, path, token, body=None, status=200, **kw):
        """Request that must succeed with status; returns the JSON body
        (None for 204)."""
        r = self.request(method, path, body=body, token=token, **kw)
        assert r.status == status, f"{method} {path}: expected {status}, got {r!r}"
        if status == 204:
            assert not r.body, f"204 with a body: {r.body[:200]!r}"
            return None
        return r.json()

    def pages(self, path, token, limit, max_pages=100):
        """Follows next_cursor from the first page; returns [page dicts]."""
        sep = "&" if "?" in path else "?"
        out = []
        cursor = None
        for _ in range(max_pages):
            url = f"{path}{sep}limit={limit}"
            if cursor is not None:
                url += "&cursor=" + urlquote(cursor)
            doc = self.ok("GET", url, token)
            check_page(doc)
            out.append(doc)
            cursor = doc["next_cursor"]
            if cursor is None:
                return out
        raise AssertionError(f"{path}: more than {max_pages} pages")


def urlquote(s):
    from urllib.parse import quote
    return quote(s, safe="")


def check_token_doc(doc):
    assert set(doc) >= {"access_token", "refresh_token", "token_type", "expires_in"}, doc
    assert doc["token_type"] == "Bearer", doc
    assert doc["expires_in"] == 900, doc
    assert isinstance(doc["refresh_token"], str) and len(doc["refresh_token"]) >= 16, doc
    parts = doc["access_token"].split(".")
    assert len(parts) == 3 and all(parts[:2]), f"access token is not a compact JWS: {doc}"
    jwt_decode(doc["access_token"])


def check_page(doc):
    assert isinstance(doc, dict) and set(doc) >= {"items", "next_cursor"}, doc
    assert isinstance(doc["items"], list), doc
    assert doc["next_cursor"] is None or (isinstance(doc["next_cursor"], str)
                                          and doc["next_cursor"]), doc


# --------------------------------------------------------------------------
# JWT handling (only to forge bad tokens: nothing here can sign a good one)


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def jwt_decode(token):
    """(header dict, payload dict, signature bytes) without verifying."""
    h, p, s = token.split(".")
    return json.loads(b64url_decode(h)), json.loads(b64url_decode(p)), b64url_decode(s)


def jwt_encode(header, payload, signature=b""):
    enc = lambda d: b64url(json.dumps(d, separators=(",", ":")).encode())  # noqa: E731
    return f"{enc(header)}.{enc(payload)}.{b64url(signature)}"


def jwt_hs256(header, payload, secret):
    import hashlib
    import hmac
    enc = lambda d: b64url(json.dumps(d, separators=(",", ":")).encode())  # noqa: E731
    signing_input = f"{enc(header)}.{enc(payload)}".encode()
    sig = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return f"{signing_input.decode()}.{b64url(sig)}"


# --------------------------------------------------------------------------
# Users through the command line


class EventStream:
    """A Server-Sent Events stream of the API (GET with a token), read event
    by event: next(timeout) returns (event, data parsed as JSON) or raises
    WaitTimeout. close() when done."""

    def __init__(self, api, path, token):
        self.conn = http.client.HTTPConnection(api.host, api.port, timeout=10)
        self.conn.request("GET", API + path, headers={
            "Authorization": f"Bearer {token}", "Accept": "text/event-stream"})
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.sock = self.conn.sock

    def next(self, timeout=10):
        from helpers import WaitTimeout
        deadline = time.monotonic() + timeout
        event, data = "message", ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(f"no event within {timeout}s")
            self.sock.settimeout(left)
            try:
                line = self.resp.fp.readline()
            except (socket.timeout, TimeoutError):
                raise WaitTimeout(f"no event within {timeout}s") from None
            if not line:
                raise WaitTimeout("the stream ended")
            line = line.decode().rstrip("\r\n")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
            elif line == "" and data:
                return event, json.loads(data)

    def close(self):
        self.conn.close()


def totp(secret_b32, offset_steps=0, at=None):
    """The RFC 6238 code of an authenticator app for secret_b32 (SHA-1,
    30 s steps, 6 digits), offset_steps away from now (or from `at`)."""
    import hashlib
    import hmac
    import struct
    key = base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8))
    step = int((at if at is not None else time.time()) // 30) + offset_steps
    mac = hmac.new(key, struct.pack(">Q", step), hashlib.sha1).digest()
    o = mac[19] & 0x0F
    return "%06d" % ((struct.unpack(">I", mac[o:o + 4])[0] & 0x7FFFFFFF) % 1000000)


def add_user(platform, username, roles, tenant=TENANT, password=None, create_tenant=False):
    """`fleetml user add` with the password on stdin; returns the password."""
    password = password or strong_password(username)
    args = [platform.bin, "user", "add", username, "--tenant", tenant,
            "--roles", ",".join(roles) if not isinstance(roles, str) else roles,
            "--password-stdin", "--data", str(platform.data)]
    if create_tenant:
        args.append("--create-tenant")
    import subprocess
    r = subprocess.run(args, input=password + "\n", capture_output=True, text=True,
                       timeout=60, cwd=platform.workdir, env=platform.env,
                       start_new_session=True)
    assert r.returncode == 0, f"user add {username}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return password


class Users:
    """Signs users in once per module and keeps their tokens."""

    def __init__(self, api):
        self.api = api
        self.passwords = {}   # (tenant, username) -> password
        self.tokens = {}      # (tenant, username) -> token doc

    def add(self, username, password, tenant=TENANT):
        self.passwords[(tenant, username)] = password

    def token(self, username, tenant=TENANT, fresh=False):
        key = (tenant, username)
        if fresh or key not in self.tokens:
            self.tokens[key] = self.api.login(username, self.passwords[key], tenant)
        return self.tokens[key]["access_token"]

    def new_session(self, username, tenant=TENANT):
        return self.api.login(username, self.passwords[(tenant, username)], tenant)


# --------------------------------------------------------------------------
# Raw HTTP (limits: headers without a body, bodies refused mid-way)


def raw_exchange(port, head, body=b"", timeout=5.0, chunk=65536):
    """Sends head (bytes, ending with a blank line) and then body in chunks,
    stopping early once the server answers.  Returns (status, headers dict
    lower-cased, body bytes, seconds until the status line arrived).
    A server that closes the connection while we are still sending is fine
    as long as its answer arrived."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    t0 = time.monotonic()
    buf = b""
    t_status = None
    try:
        s.sendall(head)
        off = 0
        while off < len(body):
            r, _, _ = select.select([s], [], [], 0)
            if r:
                break
            try:
                off += s.send(body[off:off + chunk])
            except (BrokenPipeError, ConnectionResetError):
                break
        deadline = t0 + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                data = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not data:
                break
            if t_status is None:
                t_status = time.monotonic() - t0
            buf += data
            if _response_complete(buf):
                break
    finally:
        s.close()
    if not buf:
        raise AssertionError(f"no HTTP answer within {timeout}s")
    head_b, _, rest = buf.partition(b"\r\n\r\n")
    lines = head_b.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return status, hdrs, rest, t_status


def _response_complete(buf):
    if b"\r\n\r\n" not in buf:
        return False
    head, _, rest = buf.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if m:
        return len(rest) >= int(m.group(1))
    return False


# --------------------------------------------------------------------------
# Lake


def lake_records(platform, area):
    """[(path, record)] of every gzip NDJSON object under lake/<area>/ (a
    directory or S3, see Platform.lake_records)."""
    return [(p, r) for p, r in platform.lake_records(area) if p.name.endswith(".ndjson.gz")]


def contains_value(doc, want):
    """True when want (a dict) equals doc or some dict nested in it."""
    if doc == want:
        return True
    if isinstance(doc, dict):
        return any(contains_value(v, want) for v in doc.values())
    if isinstance(doc, list):
        return any(contains_value(v, want) for v in doc)
    return False


def wait_api(api, timeout=30):
    """Waits until the API listener answers its bare GET /healthz."""
    def up():
        try:
            return api.platform.api_http("/healthz")[0] == 200
        except OSError:
            return False
    return wait_for(up, timeout, interval=0.1, msg="the API listener to answer GET /healthz")
