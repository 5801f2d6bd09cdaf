"""HTTP API over HTTPS (http.tls = on): the platform certificate, TLS 1.2+
only, HSTS, and the same API behind it."""

import http.client
import json
import ssl

import pytest


@pytest.fixture(scope="module")
def tls_platform(module_platform):
    return module_platform("https", sets={"http.tls": "on"})


def request(p, method, path, body=None, token=None, ctx=None):
    conn = http.client.HTTPSConnection("127.0.0.1", p.http_port, timeout=10,
                                       context=ctx or p.http_context())
    headers = {}
    if body is not None:
        headers["Content-Type"] = "application/json"
        body = json.dumps(body)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, dict((k.lower(), v) for k, v in r.getheaders()), data


def test_https_sign_in_and_hsts(tls_platform):
    p = tls_platform
    st, hdr, body = request(p, "POST", "/api/v1/auth/login",
                            {"tenant": "demo-hospital", "username": "admin",
                             "password": p.admin_password})
    assert st == 200, body
    assert hdr.get("strict-transport-security", "").startswith("max-age="), hdr
    tok = json.loads(body)["access_token"]
    st, hdr, body = request(p, "GET", "/api/v1/me", token=tok)
    assert st == 200 and json.loads(body)["username"] == "admin", body


def test_https_certificate_is_the_platforms(tls_platform):
    # A client that does not trust the platform CA is refused by verification.
    with pytest.raises(ssl.SSLError):
        request(tls_platform, "GET", "/healthz", ctx=ssl.create_default_context())


def test_plain_http_and_old_tls_refused(tls_platform):
    p = tls_platform
    conn = http.client.HTTPConnection("127.0.0.1", p.http_port, timeout=5)
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        conn.request("GET", "/healthz")
        conn.getresponse().read()
    conn.close()
    ctx = p.http_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    # OpenSSL's default security level may refuse TLS 1.1 on the client side
    # too; either way no TLS 1.1 session comes about.
    with pytest.raises((ssl.SSLError, OSError)):
        request(p, "GET", "/healthz", ctx=ctx)
    ctx12 = p.http_context()
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    st, _, _ = request(p, "GET", "/healthz", ctx=ctx12)
    assert st == 200
