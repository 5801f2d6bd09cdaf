"""Client addresses behind a reverse proxy (http.trusted_proxies): only a
listed proxy's X-Forwarded-For is believed, and only its right-most entry
(the one the proxy itself appended); the audit log and the per-address
sign-in throttle use that address."""

import pytest

from api_client import Api, Users

PROXY = "127.0.0.2"      # the "proxy": a loopback address we connect from
CLIENT = "127.0.0.3"     # a direct client, not trusted


@pytest.fixture(scope="module")
def env(module_platform):
    p = module_platform("proxy", sets={"http.trusted_proxies": f"{PROXY},::1"})
    admin = Users(Api(p))
    admin.add("admin", p.admin_password)
    return p, admin.token("admin")


def last_login_client(p, token, username):
    items = Api(p).ok("GET", f"/audit?action=auth.login&limit=50", token)["items"]
    mine = [i for i in items if i["target"].endswith("/" + username)]
    assert mine, items
    return mine[0]["client"]


def failed_login(api, username, xff=None):
    hdrs = {"X-Forwarded-For": xff} if xff else None
    return api.request("POST", "/auth/login",
                       body={"tenant": "demo-hospital", "username": username,
                             "password": "not the password at all"}, headers=hdrs)


def test_trusted_proxy_right_most_entry(env):
    p, tok = env
    via_proxy = Api(p, source=PROXY)
    r = failed_login(via_proxy, "nobody-1", xff="198.51.100.7, 203.0.113.9")
    assert r.status == 401, r
    assert last_login_client(p, tok, "nobody-1") == "203.0.113.9"


def test_untrusted_peer_header_ignored(env):
    p, tok = env
    direct = Api(p, source=CLIENT)
    r = failed_login(direct, "nobody-2", xff="203.0.113.50")
    assert r.status == 401, r
    assert last_login_client(p, tok, "nobody-2") == CLIENT


def test_garbage_forwarded_for_falls_back_to_peer(env):
    p, tok = env
    via_proxy = Api(p, source=PROXY)
    r = failed_login(via_proxy, "nobody-3", xff="not-an-address")
    assert r.status == 401, r
    assert last_login_client(p, tok, "nobody-3") == PROXY


def test_throttle_is_per_forwarded_address(env):
    """Two clients behind the same proxy: one spraying guesses across
    accounts is throttled by its own address, the other is not."""
    p, _ = env
    via_proxy = Api(p, source=PROXY)
    statuses = [failed_login(via_proxy, f"spray-{i}", xff="192.0.2.66").status
                for i in range(22)]
    assert 429 in statuses, statuses
    # The same proxy, another client address: not throttled.
    assert failed_login(via_proxy, "innocent", xff="192.0.2.77").status == 401
