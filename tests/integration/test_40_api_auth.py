"""HTTP API v1: sign-in, tokens, sessions, /me, users and roles
(docs/openapi.yaml: Auth, Me, Users, role table, 401/403 rules).

One platform for the module; users are created with `fleetml user add`
before serve starts.  Sign-in failures that must not disturb each other use
their own client address (127.0.0.x) so the per-address throttle is not
what a test measures by accident."""

import subprocess
from types import SimpleNamespace

import pytest

from api_client import (Api, Users, add_user, b64url, check_error, check_page,
                        check_security_headers, check_token_doc, check_unauthorized,
                        is_rfc3339_ms, jwt_decode, jwt_encode, jwt_hs256, strong_password)
from helpers import TENANT, Device, make_measurement, unique_id, wait_for

DEVICE = "auth-dev"
OTHER_TENANT = "auth-elsewhere"

USERS = {
    "clin": "clinician",
    "sci": "data_scientist",
    "devm": "device_manager",
    "rot": "clinician",
    "lo": "clinician",
    "pwuser": "clinician",
    "thr": "clinician",
    "gone": "clinician",        # disabled through the CLI before serve starts
    "newbie-src": "clinician",  # unused; keeps username ordering non-trivial
    "op": "operator",
}


@pytest.fixture(scope="module")
def env(module_platform):
    pw = {}

    def setup(p):
        for name, roles in USERS.items():
            pw[name] = add_user(p, name, roles)
        p.cli("user", "disable", "gone", "--tenant", TENANT)
        pw[("ghost", OTHER_TENANT)] = add_user(p, "ghost", "admin", tenant=OTHER_TENANT,
                                               create_tenant=True)

    p = module_platform("apiauth", devices=[DEVICE], setup=setup)
    assert p.admin_password, "`fleetml init` did not print the admin password"
    api = Api(p)
    users = Users(api)
    users.add("admin", p.admin_password)
    for k, v in pw.items():
        if isinstance(k, tuple):
            users.add(k[0], v, tenant=k[1])
        else:
            users.add(k, v)
    # One stored measurement, for the role checks on measurement routes.
    d = Device(p, DEVICE).connect()
    try:
        assert all(c < 0x80 for c in d.subscribe(d.results_topic))
        mid = unique_id("auth")
        reply, _ = d.measure(make_measurement(mid))
        assert reply.json()["status"] == "ok", reply.json()
    finally:
        d.close()
    return SimpleNamespace(p=p, api=api, users=users, mid=mid, pw=pw)


def me(env, token):
    return env.api.get("/me", token=token)


# --------------------------------------------------------------------------
# Sign-in


def test_login_and_me(env):
    r = env.api.login_resp("admin", env.p.admin_password)
    assert r.status == 200, r
    check_security_headers(r)
    doc = r.json()
    check_token_doc(doc)
    header, payload, _ = jwt_decode(doc["access_token"])
    assert header.get("alg") not in (None, "none"), header
    r = me(env, doc["access_token"])
    assert r.status == 200, r
    m = r.json()
    assert set(m) >= {"id", "tenant", "username", "roles", "status", "created_at"}, m
    assert isinstance(m["id"], int) and not isinstance(m["id"], bool), m
    assert m["tenant"] == TENANT and m["username"] == "admin", m
    assert m["roles"] == ["admin"] and m["status"] == "active", m
    assert is_rfc3339_ms(m["created_at"]), m


@pytest.mark.parametrize("user,role", [("clin", "clinician"), ("sci", "data_scientist"),
                                       ("devm", "device_manager")])
def test_me_shows_roles(env, user, role):
    m = me(env, env.users.token(user))
    assert m.status == 200, m
    assert m.json()["username"] == user and m.json()["roles"] == [role], m.json()


def test_login_failures_look_alike(env):
    # Own client address: four failures here must not count against the
    # address every other test signs in from.
    api = Api(env.p, source="127.0.0.8")
    cases = {
        "wrong password": ("clin", "not-the-password-at-all", TENANT),
        "unknown user": ("nobody-here", "not-the-password-at-all", TENANT),
        "unknown tenant": ("clin", env.users.passwords[(TENANT, "clin")], "no-such-tenant"),
        "disabled user": ("gone", env.users.passwords[(TENANT, "gone")], TENANT),
    }
    bodies = {}
    for what, (u, pw, t) in cases.items():
        r = api.login_resp(u, pw, tenant=t)
        check_error(r, 401, "invalid_credentials")
        check_security_headers(r)
        assert "access_token" not in r.text and "refresh_token" not in r.text, r
        bodies[what] = r.json()
    assert len({str(b) for b in bodies.values()}) == 1, (
        f"failed sign-ins tell the cases apart: {bodies}")


@pytest.mark.parametrize("body", [
    {"tenant": TENANT, "username": "clin"},
    {"tenant": TENANT, "password": "whatever-password"},
    {"username": "clin", "password": "whatever-password"},
    {"tenant": TENANT, "username": "clin", "password": 12345678901234},
    [],
], ids=["no-password", "no-username", "no-tenant", "password-number", "array"])
def test_login_invalid_request(env, body):
    r = Api(env.p, source="127.0.0.11").post("/auth/login", body)
    check_error(r, 400, "invalid_request")


def test_login_overlong_password_400(env):
    # 129 bytes: over FM_PASSWORD_MAX, refused without hashing.
    r = Api(env.p, source="127.0.0.11").login_resp("clin", "p" * 129)
    check_error(r, 400, "invalid_request")
    # It must not have counted as a failure that locks the account either:
    # clin can still sign in.
    env.users.token("clin", fresh=True)


# --------------------------------------------------------------------------
# Refresh rotation, reuse detection, logout


def test_refresh_rotates(env):
    s1 = env.users.new_session("rot")
    r = env.api.refresh(s1["refresh_token"])
    assert r.status == 200, r
    s2 = r.json()
    check_token_doc(s2)
    assert s2["refresh_token"] != s1["refresh_token"], "refresh token not rotated"
    assert s2["access_token"] != s1["access_token"]
    m = me(env, s2["access_token"])
    assert m.status == 200 and m.json()["username"] == "rot", m
    # The newest refresh token keeps working.
    r = env.api.refresh(s2["refresh_token"])
    assert r.status == 200, r


def test_refresh_reuse_revokes_family(env):
    other = env.users.new_session("rot")          # another session of the same user
    s1 = env.users.new_session("rot")
    r = env.api.refresh(s1["refresh_token"])
    assert r.status == 200, r
    s2 = r.json()
    r = env.api.refresh(s2["refresh_token"])
    assert r.status == 200, r
    s3 = r.json()
    assert me(env, s3["access_token"]).status == 200

    # s1's refresh token was used up: presenting it again is reuse.
    r = env.api.refresh(s1["refresh_token"])
    check_error(r, 401, "invalid_token")
    # The whole family is revoked: the newest refresh token and the
    # session's access tokens stop working.
    r = env.api.refresh(s3["refresh_token"])
    check_error(r, 401, "invalid_token")
    check_unauthorized(me(env, s3["access_token"]))
    check_unauthorized(me(env, s1["access_token"]))
    del other


def test_refresh_reuse_audited_for_the_tenant(env):
    s1 = env.users.new_session("rot")
    assert env.api.refresh(s1["refresh_token"]).status == 200
    check_error(env.api.refresh(s1["refresh_token"]), 401, "invalid_token")
    # The tenant's admin sees the reuse of its user's token.
    admin = env.users.token("admin")
    a = env.api.ok("GET", "/audit?action=auth.refresh_reuse", admin)
    assert a["items"], ("no auth.refresh_reuse audit entry visible to the tenant's admin "
                        "(GET /audit?action=auth.refresh_reuse)")
    assert all(i["action"] == "auth.refresh_reuse" for i in a["items"]), a
    assert any(i["tenant"] == TENANT for i in a["items"]), a


def test_refresh_unknown_token(env):
    r = env.api.refresh(b64url(b"\0" * 32))
    check_error(r, 401, "invalid_token")
    # An access token is not a refresh token (refused as an invalid token,
    # or as an invalid field since it is far longer than a refresh token).
    r = env.api.refresh(env.users.token("clin"))
    assert r.status in (400, 401), r
    check_error(r, r.status, "invalid_token" if r.status == 401 else "invalid_request")
    r = env.api.post("/auth/refresh", {})
    check_error(r, 400, "invalid_request")


def test_logout_ends_one_session(env):
    a = env.users.new_session("lo")
    b = env.users.new_session("lo")
    r = env.api.logout(a["refresh_token"])
    assert r.status == 204, r
    assert not r.body, r
    check_error(env.api.refresh(a["refresh_token"]), 401, "invalid_token")
    check_unauthorized(me(env, a["access_token"]))
    # Another session of the same user goes on.
    assert me(env, b["access_token"]).status == 200
    r = env.api.refresh(b["refresh_token"])
    assert r.status == 200, r
    # Idempotent.
    r = env.api.logout(a["refresh_token"])
    assert r.status == 204, r


# --------------------------------------------------------------------------
# Access tokens: missing, malformed, forged


def _clin_token(env):
    t = env.users.token("clin")
    assert me(env, t).status == 200, "control: the genuine token works"
    return t


def test_no_token_401(env):
    for path in ("/me", "/devices", "/users", "/audit", "/templates", "/models",
                 f"/devices/{DEVICE}/measurements"):
        r = env.api.get(path)
        check_unauthorized(r)
        check_security_headers(r)


@pytest.mark.parametrize("scheme", ["Basic", "Token", "bearer-x", ""])
def test_other_auth_schemes_401(env, scheme):
    t = _clin_token(env)
    r = env.api.get("/me", headers={"Authorization": f"{scheme} {t}".strip()})
    check_unauthorized(r)


def _forgeries(env, token):
    h, p, sig = jwt_decode(token)
    hp = token.rsplit(".", 1)[0]
    out = {}
    out["alg-none-no-signature"] = jwt_encode(dict(h, alg="none"), p)
    out["alg-none-with-signature"] = jwt_encode(dict(h, alg="none"), p, sig)
    out["alg-None"] = jwt_encode(dict(h, alg="None"), p)
    out["alg-missing"] = jwt_encode({k: v for k, v in h.items() if k != "alg"}, p, sig)
    # HS256 with "secrets" an attacker might try: the public key, the key
    # id, an empty key.
    pub = subprocess.run(["openssl", "ec", "-in", str(env.p.data / "pki" / "jwt.key"),
                          "-pubout"], capture_output=True, timeout=30).stdout
    for name, secret in (("pubkey-pem", pub), ("kid", str(h.get("kid", "")).encode()),
                         ("empty", b"")):
        out[f"hs256-{name}"] = jwt_hs256(dict(h, alg="HS256"), p, secret)
    # Payload changed under the original signature.
    out["roles-escalated"] = jwt_encode(h, dict(p, roles=["admin", "operator"]), sig)
    out["exp-extended"] = jwt_encode(h, dict(p, exp=int(p.get("exp", 0)) + 3600), sig)
    out["sub-changed"] = jwt_encode(h, dict(p, sub="1"), sig)
    out["tenant-changed"] = jwt_encode(h, dict(p, tenant=OTHER_TENANT), sig)
    # Signature damaged or missing.
    bad = bytearray(sig)
    bad[len(bad) // 2] ^= 0x01
    out["signature-bit-flipped"] = f"{hp}.{b64url(bytes(bad))}"
    out["signature-empty"] = f"{hp}."
    out["two-parts"] = hp
    out["garbage"] = "not.a.jwt"
    out["huge"] = hp + "." + "A" * 8000
    return out


def test_forged_tokens_401(env):
    t = _clin_token(env)
    forged = _forgeries(env, t)
    accepted = {}
    for name, tok in forged.items():
        r = me(env, tok)
        if r.status != 401:
            accepted[name] = r
            continue
        check_unauthorized(r)
    assert not accepted, f"forged tokens not refused with 401: {accepted}"


def test_token_of_disabled_user_401_at_once(env):
    add_pw = strong_password("short-lived")
    admin = env.users.token("admin")
    env.api.ok("POST", "/users", admin, {"username": "short-lived", "password": add_pw,
                                         "roles": ["clinician"]}, status=201)
    s = env.api.login("short-lived", add_pw)
    assert me(env, s["access_token"]).status == 200
    u = env.api.ok("POST", "/users/short-lived/disable", admin)
    assert u["status"] == "disabled", u
    check_unauthorized(me(env, s["access_token"]))
    check_error(env.api.refresh(s["refresh_token"]), 401, "invalid_token")
    check_error(Api(env.p, source="127.0.0.12").login_resp("short-lived", add_pw), 401,
                "invalid_credentials")


# --------------------------------------------------------------------------
# /me/password


def test_change_password(env):
    old = env.users.passwords[(TENANT, "pwuser")]
    s = env.users.new_session("pwuser")
    tok = s["access_token"]
    new = strong_password("pwuser-second")

    r = env.api.post("/me/password", {"current_password": "wrong-" + old,
                                      "new_password": new}, token=tok)
    check_error(r, 401, "invalid_credentials")
    for weak in ("short-pw", "password1234", "my-PwUser-pass"):
        r = env.api.post("/me/password", {"current_password": old, "new_password": weak},
                         token=tok)
        check_error(r, 422, "weak_password")
    # Refusals changed nothing.
    assert me(env, tok).status == 200

    r = env.api.post("/me/password", {"current_password": old, "new_password": new},
                     token=tok)
    assert r.status == 204, r
    check_unauthorized(me(env, tok))
    check_error(env.api.refresh(s["refresh_token"]), 401, "invalid_token")
    check_error(Api(env.p, source="127.0.0.13").login_resp("pwuser", old), 401,
                "invalid_credentials")
    s2 = env.api.login("pwuser", new)
    assert me(env, s2["access_token"]).status == 200
    env.users.add("pwuser", new)


# --------------------------------------------------------------------------
# Users (admin)


def test_users_create_get_conflict(env):
    admin = env.users.token("admin")
    pw = strong_password("nurse-ann")
    u = env.api.ok("POST", "/users", admin, {"username": "nurse-ann", "password": pw,
                                             "roles": ["clinician"]}, status=201)
    assert set(u) >= {"id", "tenant", "username", "roles", "status", "created_at"}, u
    assert (u["tenant"], u["username"], u["roles"], u["status"]) == (
        TENANT, "nurse-ann", ["clinician"], "active"), u
    assert is_rfc3339_ms(u["created_at"]), u
    assert not [k for k in u if "password" in k.lower() or "hash" in k.lower()], u
    assert env.api.ok("GET", "/users/nurse-ann", admin) == u

    r = env.api.post("/users", {"username": "nurse-ann", "password": strong_password("x2"),
                                "roles": ["clinician"]}, token=admin)
    check_error(r, 409, "conflict")
    r = env.api.post("/users", {"username": "weakling", "password": "short",
                                "roles": ["clinician"]}, token=admin)
    check_error(r, 422, "weak_password")
    r = env.api.post("/users", {"username": "weakling", "password": "password1234",
                                "roles": ["clinician"]}, token=admin)
    check_error(r, 422, "weak_password")
    for roles in (["wizard"], [], "clinician", ["clinician", "clinician"]):
        r = env.api.post("/users", {"username": "badroles", "password":
                                    strong_password("badroles"), "roles": roles}, token=admin)
        check_error(r, 400, "invalid_request")
    check_error(env.api.get("/users/weakling", token=admin), 404, "not_found")
    check_error(env.api.get("/users/badroles", token=admin), 404, "not_found")
    # The new user can sign in.
    s = env.api.login("nurse-ann", pw)
    assert me(env, s["access_token"]).json()["roles"] == ["clinician"]


def test_users_list_paged_and_tenant_scoped(env):
    admin = env.users.token("admin")
    pages = env.api.pages("/users", admin, limit=2)
    names = [u["username"] for pg in pages for u in pg["items"]]
    assert all(len(pg["items"]) <= 2 for pg in pages), pages
    assert len(names) == len(set(names)), f"duplicates across pages: {names}"
    assert names == sorted(names), f"not ordered by username: {names}"
    assert {"admin", "clin", "sci", "devm", "gone"} <= set(names), names
    assert "ghost" not in names, "a user of another tenant is listed"
    for pg in pages:
        for u in pg["items"]:
            assert u["tenant"] == TENANT, u
            assert u["status"] in ("active", "disabled"), u
    statuses = {u["username"]: u["status"] for pg in pages for u in pg["items"]}
    assert statuses["gone"] == "disabled" and statuses["clin"] == "active", statuses
    # The other tenant's user cannot be reached by name either.
    check_error(env.api.get("/users/ghost", token=admin), 404, "not_found")
    check_error(env.api.request("PUT", "/users/ghost/roles", {"roles": ["clinician"]},
                                token=admin), 404, "not_found")
    check_error(env.api.post("/users/ghost/disable", token=admin), 404, "not_found")
    # ... and the other tenant's admin sees only its own users.
    ghost = env.users.token("ghost", tenant=OTHER_TENANT)
    theirs = env.api.ok("GET", "/users", ghost)
    check_page(theirs)
    assert [u["username"] for u in theirs["items"]] == ["ghost"], theirs
    check_error(env.api.get("/users/clin", token=ghost), 404, "not_found")


def test_role_change_ends_access_tokens(env):
    admin = env.users.token("admin")
    pw = strong_password("role-flip")
    env.api.ok("POST", "/users", admin, {"username": "role-flip", "password": pw,
                                         "roles": ["clinician"]}, status=201)
    s = env.api.login("role-flip", pw)
    assert env.api.get(f"/devices/{DEVICE}/measurements", token=s["access_token"]).status == 200
    u = env.api.ok("PUT", "/users/role-flip/roles", admin, {"roles": ["device_manager"]})
    assert u["roles"] == ["device_manager"] and u["username"] == "role-flip", u
    check_unauthorized(me(env, s["access_token"]))
    s2 = env.api.login("role-flip", pw)
    assert me(env, s2["access_token"]).json()["roles"] == ["device_manager"]
    r = env.api.get(f"/devices/{DEVICE}/measurements", token=s2["access_token"])
    check_error(r, 403, "forbidden")
    check_error(env.api.request("PUT", "/users/role-flip/roles", {"roles": ["nope"]},
                                token=admin), 400, "invalid_request")
    check_error(env.api.request("PUT", "/users/no-such-user/roles", {"roles": ["clinician"]},
                                token=admin), 404, "not_found")


def test_disable_enable_user(env):
    admin = env.users.token("admin")
    pw = strong_password("toggler")
    env.api.ok("POST", "/users", admin, {"username": "toggler", "password": pw,
                                         "roles": ["data_scientist"]}, status=201)
    s = env.api.login("toggler", pw)
    u = env.api.ok("POST", "/users/toggler/disable", admin)
    assert u["status"] == "disabled", u
    assert env.api.ok("GET", "/users/toggler", admin)["status"] == "disabled"
    check_unauthorized(me(env, s["access_token"]))
    check_error(Api(env.p, source="127.0.0.14").login_resp("toggler", pw), 401,
                "invalid_credentials")
    u = env.api.ok("POST", "/users/toggler/enable", admin)
    assert u["status"] == "active", u
    s2 = env.api.login("toggler", pw)
    assert me(env, s2["access_token"]).status == 200
    # The session ended by the disable stays ended.
    check_unauthorized(me(env, s["access_token"]))


def test_operator_spans_tenants(env):
    op = env.users.token("op")
    theirs = env.api.ok("GET", f"/users?tenant={OTHER_TENANT}", op)
    assert [u["username"] for u in theirs["items"]] == ["ghost"], theirs
    assert all(u["tenant"] == OTHER_TENANT for u in theirs["items"]), theirs
    u = env.api.ok("GET", f"/users/ghost?tenant={OTHER_TENANT}", op)
    assert u["username"] == "ghost" and u["tenant"] == OTHER_TENANT, u
    own = env.api.ok("GET", "/users", op)
    assert "ghost" not in [x["username"] for x in own["items"]], own
    assert env.api.get(f"/devices/{DEVICE}/measurements", token=op).status == 200
    # A tenant admin cannot do the same.
    r = env.api.get(f"/users?tenant={OTHER_TENANT}", token=env.users.token("admin"))
    assert r.status in (200, 400, 403, 404), r
    assert "ghost" not in r.text, f"a tenant admin listed another tenant's users: {r!r}"


# --------------------------------------------------------------------------
# Role denials (403) and grants


def _label_body():
    return {"outputs": {"hematocrit_pct": 42.0}, "source": "lab"}


def _denials(env):
    mid = env.mid
    meas = f"/devices/{DEVICE}/measurements"
    return [
        ("clin", "POST", "/users", {"username": "x-by-clin", "password":
                                    strong_password("x-by-clin"), "roles": ["admin"]}),
        ("clin", "GET", "/users", None),
        ("clin", "GET", "/audit", None),
        ("clin", "POST", f"/devices/{DEVICE}/disable", None),
        ("clin", "PATCH", f"/devices/{DEVICE}/shadow", {"desired": {"a": 1}}),
        ("clin", "GET", "/templates", None),
        ("devm", "GET", meas, None),
        ("devm", "GET", f"{meas}/{mid}", None),
        ("devm", "PUT", f"{meas}/{mid}/label", _label_body()),
        ("devm", "POST", "/models/viscosity/predict", make_measurement(unique_id("p"))),
        ("devm", "GET", "/users", None),
        ("devm", "GET", "/audit", None),
        ("devm", "POST", "/templates", {"name": "tpl-by-devm"}),
        ("admin", "GET", meas, None),
        ("admin", "GET", f"{meas}/{mid}", None),
        ("admin", "PUT", f"{meas}/{mid}/label", _label_body()),
        ("admin", "POST", "/models/viscosity/predict", make_measurement(unique_id("p"))),
        ("sci", "PUT", f"{meas}/{mid}/label", _label_body()),
        ("sci", "POST", "/users", {"username": "x-by-sci", "password":
                                   strong_password("x-by-sci"), "roles": ["clinician"]}),
        ("sci", "POST", f"/devices/{DEVICE}/revoke", None),
        ("sci", "PATCH", f"/devices/{DEVICE}/shadow", {"desired": {"a": 1}}),
        ("sci", "GET", "/audit", None),
    ]


def test_role_denials_403(env):
    wrong = []
    for user, method, path, body in _denials(env):
        r = env.api.request(method, path, body=body, token=env.users.token(user))
        if r.status != 403:
            wrong.append((user, method, path, r))
            continue
        check_error(r, 403, "forbidden")
        check_security_headers(r)
    assert not wrong, "expected 403 forbidden:\n" + "\n".join(map(str, wrong))
    # Nothing the denied calls asked for happened.
    admin = env.users.token("admin")
    dev = env.api.ok("GET", f"/devices/{DEVICE}", admin)
    assert dev["status"] == "active", dev
    check_error(env.api.get("/users/x-by-clin", token=admin), 404, "not_found")
    check_error(env.api.get("/users/x-by-sci", token=admin), 404, "not_found")
    got = env.api.ok("GET", f"/devices/{DEVICE}/measurements/{env.mid}",
                     env.users.token("clin"))
    assert got["label"] is None, got
    # Denials are audited.
    a = env.api.ok("GET", "/audit?action=access.denied&limit=100", admin)
    actors = {i["actor"] for i in a["items"]}
    assert {f"user:{TENANT}/clin", f"user:{TENANT}/devm", f"user:{TENANT}/admin",
            f"user:{TENANT}/sci"} <= actors, actors
    assert all(i["outcome"] == "denied" for i in a["items"]), a["items"][:3]


def test_role_grants(env):
    mid = env.mid
    meas = f"/devices/{DEVICE}/measurements"
    allowed = [
        ("admin", "GET", "/users"), ("admin", "GET", "/audit"), ("admin", "GET", "/templates"),
        ("admin", "GET", "/devices"), ("admin", "GET", f"/devices/{DEVICE}/shadow"),
        ("clin", "GET", "/devices"), ("clin", "GET", meas), ("clin", "GET", f"{meas}/{mid}"),
        ("clin", "GET", "/models"),
        ("sci", "GET", "/devices"), ("sci", "GET", meas), ("sci", "GET", f"{meas}/{mid}"),
        ("sci", "GET", "/models"),
        ("devm", "GET", "/devices"), ("devm", "GET", f"/devices/{DEVICE}"),
        ("devm", "GET", f"/devices/{DEVICE}/shadow"),
    ]
    wrong = []
    for user, method, path in allowed:
        r = env.api.request(method, path, token=env.users.token(user))
        if r.status != 200:
            wrong.append((user, method, path, r))
    assert not wrong, "expected 200:\n" + "\n".join(map(str, wrong))
    # The device manager may manage devices (enable of an active device).
    d = env.api.ok("POST", f"/devices/{DEVICE}/enable", env.users.token("devm"))
    assert d["status"] == "active", d


# --------------------------------------------------------------------------
# Throttling (last in the module: it locks an account)


def test_per_address_allowance_larger_than_per_account(env):
    # Six failures from one address, one per account: no account reached
    # its 5, and the address allowance is larger than an account's.
    api = Api(env.p, source="127.0.0.10")
    got = []
    for i in range(6):
        r = api.login_resp(f"nobody-{i}", "not-the-password-at-all")
        got.append(r.status)
        check_error(r, 401, "invalid_credentials")
    assert got == [401] * 6, got


def test_throttle_after_five_failures(env):
    api = Api(env.p, source="127.0.0.9")
    right = env.users.passwords[(TENANT, "thr")]
    statuses = []
    for _ in range(5):
        r = api.login_resp("thr", "wrong-password-for-thr")
        statuses.append(r.status)
        check_error(r, 401, "invalid_credentials")
    # Past five failures the account is throttled: at the latest the
    # second attempt after them is refused with 429.
    throttled = None
    for _ in range(2):
        r = api.login_resp("thr", "wrong-password-for-thr")
        statuses.append(r.status)
        if r.status == 429:
            throttled = r
            break
        check_error(r, 401, "invalid_credentials")
    assert throttled is not None, f"no 429 after 5 failures: {statuses}"
    check_error(throttled, 429, "too_many_requests")
    ra = throttled.header("Retry-After")
    assert ra is not None and ra.strip().isdigit() and 1 <= int(ra) <= 900, (
        f"Retry-After {ra!r}")
    check_security_headers(throttled)
    # While locked even the right password is refused, from any address.
    r = Api(env.p, source="127.0.0.15").login_resp("thr", right)
    check_error(r, 429, "too_many_requests")
    assert (r.header("Retry-After") or "").strip().isdigit(), r.headers
    assert int(ra) == 1, f"first lock is 1 s, Retry-After {ra!r}"
    # Other accounts are not affected.
    env.users.token("clin", fresh=True)
    # Once the lock expires a wrong password is judged (401) and locks the
    # account again for twice as long.  Attempts while locked are not
    # counted.
    wait_for(lambda: api.login_resp("thr", "wrong-password-for-thr").status == 401, 10,
             interval=0.1, msg="thr's first lock to expire")
    r = api.login_resp("thr", "wrong-password-for-thr")
    check_error(r, 429, "too_many_requests")
    assert (r.header("Retry-After") or "").strip() == "2", (
        f"second lock should be 2 s, Retry-After {r.header('Retry-After')!r}")
    # Then the right password works again.
    wait_for(lambda: Api(env.p, source="127.0.0.15").login_resp("thr", right).status == 200,
             10, interval=0.25, msg="thr's lock to expire")
    # ... and the success reset the account's count: one failure is a 401.
    check_error(api.login_resp("thr", "wrong-password-for-thr"), 401, "invalid_credentials")
    # The throttled attempts are audited.
    admin = env.users.token("admin")
    a = env.api.ok("GET", "/audit?action=auth.login&limit=200", admin)
    assert any(i["outcome"] == "throttled" for i in a["items"]), (
        "no auth.login audit entry with outcome throttled")


def test_admin_cannot_touch_operator_or_grant_it(env):
    """A tenant admin manages its staff, not the platform operator: it can
    neither grant the operator role nor demote or disable an operator."""
    admin = env.users.token("admin")
    for path, body in (("/users/op/roles", {"roles": ["clinician"]}),
                       ("/users/op/disable", None)):
        method = "PUT" if body else "POST"
        check_error(env.api.request(method, path, body=body, token=admin), 403, "forbidden")
    check_error(env.api.put("/users/clin/roles", {"roles": ["operator"]}, token=admin), 403,
                "forbidden")
    check_error(env.api.post("/users", {"username": "would-be-op",
                                        "password": strong_password("would-be-op"),
                                        "roles": ["operator"]}, token=admin), 403, "forbidden")
    u = env.api.ok("GET", "/users/op", admin)
    assert u["roles"] == ["operator"] and u["status"] == "active", u
    # The operator still works.
    assert env.api.get("/me", token=env.users.token("op")).status == 200


def test_zz_no_secrets_in_logs(env):
    """Runs last in this module: after every sign-in, refresh, password
    change and forged token above, neither the service log nor the broker
    log holds a password, an access token or a refresh token."""
    doc = env.api.login("admin", env.p.admin_password)
    env.api.refresh(doc["refresh_token"])
    env.api.refresh(doc["refresh_token"])  # reuse: logged as an event
    secrets = [env.p.admin_password, doc["refresh_token"], doc["access_token"][:40]]
    secrets += [v for v in env.pw.values() if isinstance(v, str)]
    logs = [open(p, errors="replace").read() for p in env.p.log_paths]
    broker_log = env.p.data / "broker" / "mosquitto.log"
    if broker_log.exists():
        logs.append(broker_log.read_text(errors="replace"))
    text = "\n".join(logs)
    assert "refresh token reused" in text, "the reuse was not logged at all"
    for s in secrets:
        assert s not in text, f"a secret ({s[:6]}...) appears in a log"
    assert "eyJ" not in text, "something JWT-like appears in a log"
