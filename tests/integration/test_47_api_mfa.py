"""HTTP API v1: the TOTP second factor (RFC 6238), driven like an
authenticator app would (the test computes codes with hmac/hashlib from the
secret the API hands out): enrolment, confirmation, sign-in with and
without a code, replay, password change and disable needing the code, and
an admin's reset for a lost phone."""

import time
from types import SimpleNamespace

import pytest

from api_client import Api, Users, add_user, check_error, totp
from helpers import TENANT, wait_for


@pytest.fixture(scope="module")
def env(module_platform):
    pw = {}

    def setup(p):
        for name in ("mfa-alice", "mfa-bob", "mfa-carol"):
            pw[name] = add_user(p, name, "clinician")

    p = module_platform("apimfa", setup=setup)
    api = Api(p)
    users = Users(api)
    users.add("admin", p.admin_password)
    for k, v in pw.items():
        users.add(k, v)
    return SimpleNamespace(p=p, api=api, users=users, pw=pw)


def login(env, user, otp=None):
    body = {"tenant": TENANT, "username": user, "password": env.pw[user]}
    if otp is not None:
        body["otp"] = otp
    return env.api.post("/auth/login", body)


def settle():
    """Waits (at most a few seconds) until the current 30 s step has at
    least 8 s left, so the steps a test computes stay the server's too."""
    wait_for(lambda: time.time() % 30 < 22, 10, interval=0.2, msg="a fresh TOTP step")


def enrol(env, user):
    """Enrols and confirms with the previous step's code (accepted as clock
    drift), leaving the current and the next step's codes for the test."""
    settle()
    tok = env.users.token(user)
    r = env.api.post("/me/mfa/totp", {"current_password": env.pw[user]}, token=tok)
    assert r.status == 201, r
    doc = r.json()
    assert doc["confirmed"] is False and doc["digits"] == 6 and doc["period"] == 30, doc
    assert doc["otpauth_uri"].startswith("otpauth://totp/"), doc
    assert f"secret={doc['secret']}" in doc["otpauth_uri"], doc
    # Not required until confirmed.
    assert login(env, user).status == 200
    me = env.api.ok("POST", "/me/mfa/totp/confirm", tok, body={"otp": totp(doc["secret"], -1)})
    assert me["mfa"] is True and me["username"] == user, me
    return doc["secret"]


def test_enrol_confirm_and_sign_in(env):
    secret = enrol(env, "mfa-alice")
    r = login(env, "mfa-alice")
    check_error(r, 401, "mfa_required")
    assert "access_token" not in r.text
    wrong = "%06d" % ((int(totp(secret)) + 1) % 1000000)
    check_error(login(env, "mfa-alice", wrong), 401, "invalid_credentials")
    code = totp(secret)
    r = login(env, "mfa-alice", code)
    assert r.status == 200, r
    # A code works once, and an older step than the last one used never.
    check_error(login(env, "mfa-alice", code), 401, "invalid_credentials")
    check_error(login(env, "mfa-alice", totp(secret, -1)), 401, "invalid_credentials")
    # Another enrolment while one is active: 409 (after re-authenticating).
    tok = r.json()["access_token"]
    check_error(env.api.post("/me/mfa/totp", {"current_password": env.pw["mfa-alice"],
                                              "otp": totp(secret, +1)}, token=tok),
                409, "conflict")
    # The admin sees it in the user object.
    u = env.api.ok("GET", "/users/mfa-alice", env.users.token("admin"))
    assert u["mfa"] is True, u


def test_confirm_needs_a_pending_enrolment_and_a_right_code(env):
    tok = env.users.token("mfa-carol")
    check_error(env.api.post("/me/mfa/totp/confirm", {"otp": "123456"}, token=tok), 409,
                "conflict")
    r = env.api.post("/me/mfa/totp", {"current_password": "not her password at all"},
                     token=tok)
    check_error(r, 401, "invalid_credentials")
    r = env.api.post("/me/mfa/totp", {"current_password": env.pw["mfa-carol"]}, token=tok)
    assert r.status == 201, r
    secret = r.json()["secret"]
    codes = {totp(secret, d) for d in (-1, 0, 1)}
    wrong = next("%06d" % i for i in range(1000000) if "%06d" % i not in codes)
    check_error(env.api.post("/me/mfa/totp/confirm", {"otp": wrong}, token=tok), 422,
                "validation_failed")
    assert env.api.ok("GET", "/me", tok)["mfa"] is False


def test_disable_needs_password_and_code(env):
    user = "mfa-bob"
    secret = enrol(env, user)
    r = login(env, user, totp(secret))
    assert r.status == 200, r
    tok = r.json()["access_token"]
    check_error(env.api.post("/me/mfa/totp/disable", {"current_password": env.pw[user]},
                             token=tok), 401, "mfa_required")
    # Changing the password needs the code too.
    check_error(env.api.post("/me/password", {"current_password": env.pw[user],
                                              "new_password": "a brand new long phrase 7"},
                             token=tok), 401, "mfa_required")
    r = env.api.post("/me/mfa/totp/disable", {"current_password": env.pw[user],
                                              "otp": totp(secret, +1)}, token=tok)
    assert r.status == 204, r
    assert login(env, user).status == 200
    assert env.api.ok("GET", "/me", tok)["mfa"] is False


def test_admin_resets_a_lost_factor(env):
    user = "mfa-carol"
    settle()
    tok = env.users.token(user, fresh=True)
    # carol has a pending enrolment from the test above: it is replaced.
    r = env.api.post("/me/mfa/totp", {"current_password": env.pw[user]}, token=tok)
    assert r.status == 201, r
    secret = r.json()["secret"]
    env.api.ok("POST", "/me/mfa/totp/confirm", tok, body={"otp": totp(secret)})
    check_error(login(env, user), 401, "mfa_required")
    admin = env.users.token("admin")
    # Not for a clinician to do.
    check_error(env.api.post(f"/users/{user}/mfa/reset", token=tok), 403, "forbidden")
    u = env.api.ok("POST", f"/users/{user}/mfa/reset", admin)
    assert u["mfa"] is False, u
    # The reset ends carol's sessions and she signs in with her password again.
    assert env.api.get("/me", token=tok).status == 401
    assert login(env, user).status == 200
    actions = [i["action"] for i in
               env.api.ok("GET", "/audit?limit=200", admin)["items"]]
    assert "user.mfa_reset" in actions and "user.mfa" in actions, actions


def test_roles_that_require_a_second_factor(module_platform):
    """http.mfa_roles=admin: an admin who signed in without a code can reach
    only its own account (to enrol), until it signs in with one; the
    requirement survives token refresh. Other roles are not affected."""
    pw = {}

    def setup(p):
        pw["clin"] = add_user(p, "req-clin", "clinician")

    p = module_platform("apimfareq", sets={"http.mfa_roles": "admin"}, setup=setup)
    api = Api(p)
    body = {"tenant": TENANT, "username": "admin", "password": p.admin_password}
    s1 = api.post("/auth/login", body).json()
    tok = s1["access_token"]
    check_error(api.get("/users", token=tok), 403, "mfa_required")
    check_error(api.get("/devices", token=tok), 403, "mfa_required")
    assert api.get("/me", token=tok).status == 200
    # A clinician is not concerned.
    clin = api.post("/auth/login", {"tenant": TENANT, "username": "req-clin",
                                    "password": pw["clin"]}).json()["access_token"]
    assert api.get("/devices", token=clin).status == 200
    # Enrol from the restricted session, then sign in with a code.
    settle()
    r = api.post("/me/mfa/totp", {"current_password": p.admin_password}, token=tok)
    assert r.status == 201, r
    secret = r.json()["secret"]
    api.ok("POST", "/me/mfa/totp/confirm", tok, body={"otp": totp(secret, -1)})
    check_error(api.get("/users", token=tok), 403, "mfa_required")  # still the old session
    s2 = api.post("/auth/login", dict(body, otp=totp(secret))).json()
    assert api.get("/users", token=s2["access_token"]).status == 200
    # Refreshing keeps the session's second factor.
    s3 = api.refresh(s2["refresh_token"]).json()
    assert api.get("/users", token=s3["access_token"]).status == 200
    # Refreshing the code-less session does not gain it.
    s4 = api.refresh(s1["refresh_token"]).json()
    check_error(api.get("/users", token=s4["access_token"]), 403, "mfa_required")
