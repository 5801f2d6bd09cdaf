"""HTTP API v1 transport rules: body limits (413 before reading), security
headers, tokens only in the Authorization header, 404/405/415 errors,
pagination parameters, and the OpenAPI document against the routes the
server registers (docs/openapi.yaml: Errors, Limits and headers,
Other)."""

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from api_client import (API, Api, EventStream, Users, add_user, check_error, check_security_headers,
                        check_unauthorized, raw_exchange, strong_password)
from helpers import TENANT, encode, make_measurement, unique_id

DEVICE = "tr-dev"
REPO = Path(__file__).resolve().parents[2]
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")

# Every endpoint of the contract, with path parameters written as {}.
SPEC_ROUTES = {
    ("POST", "/auth/login"), ("POST", "/auth/refresh"), ("POST", "/auth/logout"),
    ("GET", "/me"), ("POST", "/me/password"),
    ("GET", "/users"), ("POST", "/users"), ("GET", "/users/{}"),
    ("PUT", "/users/{}/roles"), ("POST", "/users/{}/disable"), ("POST", "/users/{}/enable"),
    ("GET", "/devices"), ("GET", "/devices/{}"), ("POST", "/devices/{}/disable"),
    ("POST", "/devices/{}/enable"), ("POST", "/devices/{}/revoke"),
    ("GET", "/devices/{}/shadow"), ("PATCH", "/devices/{}/shadow"),
    ("GET", "/templates"), ("POST", "/templates"), ("POST", "/templates/{}/claim-cert"),
    ("GET", "/devices/{}/measurements"), ("GET", "/devices/{}/measurements/{}"),
    ("PUT", "/devices/{}/measurements/{}/label"),
    ("GET", "/devices/{}/measurements/{}/lineage"),
    ("GET", "/models"), ("POST", "/models/{}/predict"),
    ("POST", "/models/{}/invocations"),
    ("POST", "/models/{}/versions"), ("GET", "/models/{}/versions"),
    ("GET", "/models/{}/versions/{}"), ("POST", "/models/{}/versions/{}/approve"),
    ("POST", "/models/{}/versions/{}/reject"), ("GET", "/models/{}/aliases"),
    ("GET", "/models/{}/drift"), ("POST", "/training-jobs"), ("GET", "/training-jobs/{}"),
    ("PUT", "/models/{}/aliases/{}"),
    ("GET", "/audit"), ("GET", "/openapi.yaml"),
}


@pytest.fixture(scope="module")
def env(module_platform):
    pw = {}

    def setup(p):
        pw["clin"] = add_user(p, "clin", "clinician")
        pw["devm"] = add_user(p, "devm", "device_manager")

    p = module_platform("apitransport", devices=[DEVICE], setup=setup)
    api = Api(p)
    users = Users(api)
    users.add("admin", p.admin_password)
    for n, v in pw.items():
        users.add(n, v)
    return SimpleNamespace(p=p, api=api, users=users)


def tok(env, user):
    return env.users.token(user)


def head(method, path, length, token=None, ctype="application/json"):
    lines = [f"{method} {API}{path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {ctype}",
             f"Content-Length: {length}", "Connection: close"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def check_raw_error(status, hdrs, body, want_status, want_code):
    assert status == want_status, f"expected {want_status}, got {status} {body[:300]!r}"
    doc = json.loads(body)
    assert doc["error"]["code"] == want_code, doc
    assert doc["error"]["message"], doc


# --------------------------------------------------------------------------
# Headers


def test_security_headers_on_api_responses(env):
    t = tok(env, "clin")
    responses = {
        "200 /me": env.api.get("/me", token=t),
        "200 login": env.api.login_resp("clin", env.users.passwords[(TENANT, "clin")]),
        "200 openapi": env.api.get("/openapi.yaml", token=t),
        "401": env.api.get("/me"),
        "403": env.api.get("/users", token=t),
        "404": env.api.get("/no-such-route", token=t),
        "400": env.api.post("/auth/login", raw=b"{", token=None),
        "204": env.api.logout("unknown-refresh-token-" + unique_id()),
    }
    for what, r in responses.items():
        assert r.status == int(what[:3]), (what, r)
        try:
            check_security_headers(r)
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}") from None
    assert responses["200 /me"].header("Content-Type").split(";")[0] == "application/json"


# --------------------------------------------------------------------------
# Tokens only in the Authorization header


@pytest.mark.parametrize("name", ["access_token", "token", "refresh_token", "jwt"])
def test_token_in_query_string_400(env, name):
    t = tok(env, "clin")
    r = env.api.get(f"/me?{name}={t}")
    check_error(r, 400, "invalid_request")
    check_security_headers(r)
    # Even alongside a valid header, and whatever the value.
    r = env.api.get(f"/me?{name}=x", token=t)
    check_error(r, 400, "invalid_request")
    r = env.api.get(f"/devices?limit=5&{name}={t}", token=t)
    check_error(r, 400, "invalid_request")
    r = env.api.post(f"/auth/refresh?{name}=x", {"refresh_token": "x" * 43})
    check_error(r, 400, "invalid_request")
    r = env.api.post(f"/auth/login?{name}=x",
                     {"tenant": TENANT, "username": "clin",
                      "password": env.users.passwords[(TENANT, "clin")]})
    check_error(r, 400, "invalid_request")
    assert "access_token" not in r.text, "login answered tokens despite a token in the URL"


# --------------------------------------------------------------------------
# 404, 405, 415, 400


@pytest.mark.parametrize("path", ["/no-such-route", "/devices/tr-dev/no-such-leaf",
                                  "/devices/tr-dev/measurements/m1/label/extra", "/",
                                  "/users/clin/roles/x"])
def test_unknown_route_404_json(env, path):
    r = env.api.get(path, token=tok(env, "admin"))
    check_error(r, 404, "not_found")
    check_security_headers(r)


@pytest.mark.parametrize("method,path,allowed", [
    ("DELETE", "/me", {"GET"}),
    ("GET", "/auth/login", {"POST"}),
    ("PUT", "/devices", {"GET"}),
    ("DELETE", f"/devices/{DEVICE}", {"GET"}),
    ("GET", f"/devices/{DEVICE}/disable", {"POST"}),
    ("POST", f"/devices/{DEVICE}/shadow", {"GET", "PATCH"}),
    ("GET", "/me/password", {"POST"}),
    ("PATCH", "/users", {"GET", "POST"}),
])
def test_wrong_method_405_with_allow(env, method, path, allowed):
    body = {} if method in ("POST", "PUT", "PATCH") else None
    r = env.api.request(method, path, body=body, token=tok(env, "admin"))
    check_error(r, 405, "method_not_allowed")
    allow = r.header("Allow")
    assert allow, f"405 without Allow: {r.headers}"
    got = {m.strip().upper() for m in allow.split(",") if m.strip()}
    assert allowed <= got, f"Allow {allow!r} lacks {allowed - got}"
    assert method not in got, f"Allow {allow!r} lists the refused method"
    check_security_headers(r)


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded",
                                   "application/xml", "multipart/form-data; boundary=x"])
def test_non_json_content_type_415(env, ctype):
    body = json.dumps({"tenant": TENANT, "username": "clin",
                       "password": env.users.passwords[(TENANT, "clin")]}).encode()
    r = env.api.post("/auth/login", raw=body, content_type=ctype)
    check_error(r, 415, "unsupported_media_type")
    assert "access_token" not in r.text
    r = env.api.patch(f"/devices/{DEVICE}/shadow", raw=b'{"desired": {"a": 1}}',
                      content_type=ctype, token=tok(env, "admin"))
    check_error(r, 415, "unsupported_media_type")


def test_json_with_charset_accepted(env):
    body = json.dumps({"tenant": TENANT, "username": "clin",
                       "password": env.users.passwords[(TENANT, "clin")]}).encode()
    r = env.api.post("/auth/login", raw=body, content_type="application/json; charset=utf-8")
    assert r.status == 200, r


@pytest.mark.parametrize("raw", [b"{", b"", b"[]", b'{"tenant": "a", "tenant": "b"}x',
                                 b"\xff\xfe{}", b"null"],
                         ids=["truncated", "empty", "array", "trailing", "bad-utf8", "null"])
def test_malformed_json_400(env, raw):
    r = env.api.post("/auth/login", raw=raw)
    check_error(r, 400, "invalid_request")


@pytest.mark.parametrize("query", ["limit=0", "limit=501", "limit=-1", "limit=abc",
                                   "limit=1e2", "cursor=%7B%7D%7B", "cursor="],
                         ids=["0", "501", "neg", "abc", "float", "bad-cursor", "empty-cursor"])
def test_bad_pagination_400(env, query):
    for path in ("/devices", "/users", "/audit"):
        r = env.api.get(f"{path}?{query}", token=tok(env, "admin"))
        check_error(r, 400, "invalid_request")


def test_pagination_bounds_accepted(env):
    for limit in (1, 50, 500):
        r = env.api.get(f"/devices?limit={limit}", token=tok(env, "admin"))
        assert r.status == 200, (limit, r)
        assert len(r.json()["items"]) <= limit


# --------------------------------------------------------------------------
# Body limits


def test_declared_length_over_limit_413_before_body(env):
    # Headers only: a server that waited for the body would time out here.
    t = tok(env, "admin")
    cases = [
        ("POST", "/auth/login", 16 * 1024 + 1, None),
        ("POST", "/auth/refresh", 100_000, None),
        ("POST", "/me/password", 16 * 1024 + 1, t),
        ("POST", "/users", 16 * 1024 + 1, t),
        ("PATCH", f"/devices/{DEVICE}/shadow", 64 * 1024 + 1, t),
        ("POST", "/templates", 64 * 1024 + 1, t),
        ("POST", "/models/viscosity/predict", 256 * 1024 + 1, tok(env, "clin")),
        ("POST", "/auth/login", 10 ** 9, None),
    ]
    for method, path, length, token in cases:
        t0 = time.monotonic()
        status, hdrs, body, _ = raw_exchange(env.p.http_port, head(method, path, length, token),
                                             timeout=3)
        took = time.monotonic() - t0
        check_raw_error(status, hdrs, body, 413, "payload_too_large")
        assert took < 1.0, f"{method} {path} Content-Length {length}: 413 after {took:.2f}s"


def test_megabyte_password_413_fast(env):
    body = json.dumps({"tenant": TENANT, "username": "admin",
                       "password": "a" * (1024 * 1024)}).encode()
    t0 = time.monotonic()
    status, hdrs, resp, t_status = raw_exchange(
        env.p.http_port, head("POST", "/auth/login", len(body)), body, timeout=5)
    took = time.monotonic() - t0
    check_raw_error(status, hdrs, resp, 413, "payload_too_large")
    print(f"1 MB password: 413 after {t_status:.3f}s (exchange {took:.3f}s)")
    assert t_status < 1.0, f"413 after {t_status:.2f}s"
    for k in ("x-content-type-options", "cache-control"):
        assert k in hdrs, f"413 without {k}: {hdrs}"
    # The admin's account was not charged a failure: sign-in still works.
    env.users.token("admin", fresh=True)


def test_within_limits_not_413(env):
    # 15 KiB to /auth/login is under its 16 KiB limit: read and judged
    # (password too long -> 400).
    r = env.api.post("/auth/login", {"tenant": TENANT, "username": "clin",
                                     "password": "b" * (15 * 1024)})
    check_error(r, 400, "invalid_request")
    # 100 KiB to predict: over the 64 KiB default, under predict's 256 KiB.
    doc = make_measurement(unique_id("big"))
    big = dict(doc, meta={"note": "n" * (100 * 1024 - len(encode(doc)))})
    assert 64 * 1024 < len(encode(big)) < 256 * 1024
    r = env.api.post("/models/viscosity/predict", big, token=tok(env, "clin"))
    assert r.status in (200, 422), r
    # 20 KiB JSON to /users: over its 16 KiB limit even if well-formed.
    r = env.api.post("/users", {"username": "padded", "password": strong_password("padded"),
                                "roles": ["clinician"], "x": "p" * (20 * 1024)},
                     token=tok(env, "admin"))
    check_error(r, 413, "payload_too_large")
    check_error(env.api.get("/users/padded", token=tok(env, "admin")), 404, "not_found")


def test_small_json_body_on_action_post_accepted(env):
    # The default body limit is 64 KiB: an (ignored) empty JSON object on
    # an action endpoint such as enable is not "too large".
    admin = tok(env, "admin")
    r = env.api.post(f"/devices/{DEVICE}/enable", {}, token=admin)
    assert r.status == 200 and r.json()["status"] == "active", r
    r = env.api.post("/users/clin/enable", {}, token=admin)
    assert r.status == 200 and r.json()["status"] == "active", r


def test_overlong_password_refused_quickly(env):
    # 129 bytes .. 16 KiB: refused without hashing (a hash costs ~50 ms;
    # 20 of them would take about a second).
    t0 = time.monotonic()
    for i in range(20):
        r = env.api.login_resp("clin", "c" * (129 + i * 500))
        check_error(r, 400, "invalid_request")
    took = time.monotonic() - t0
    assert took < 1.0, f"20 overlong-password sign-ins took {took:.2f}s"


# --------------------------------------------------------------------------
# OpenAPI


def served_openapi(env):
    r = env.api.get("/openapi.yaml", token=tok(env, "clin"))
    assert r.status == 200, r
    return r, yaml.safe_load(r.body)


def documented_routes(doc):
    out = set()
    for path, ops in (doc.get("paths") or {}).items():
        for m in ops:
            if m.upper() in METHODS:
                out.add((m.upper(), path))
    return out


def cli_routes(env):
    r = env.p.run("api", "routes", check=False)
    if r.returncode != 0:
        r = env.p.cli("api", "routes")
    out = set()
    lines = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
    assert lines, f"`fleetml api routes` printed nothing\n{r.stderr}"
    for ln in lines:
        m = re.match(r"([A-Z]+)\s+(/\S*)", ln)
        assert m and m.group(1) in METHODS, f"unexpected line from `fleetml api routes`: {ln!r}"
        method, path = m.groups()
        if path.startswith(API + "/"):
            out.add((method, path[len(API):]))
    return out


def test_api_routes_line_format(env):
    # The contract: one route per line, `METHOD /api/v1/path/{param}`.
    r = env.p.run("api", "routes")
    odd = [ln for ln in r.stdout.splitlines()
           if ln.strip() and not re.fullmatch(r"[A-Z]+ /api/v1(/[^\s]*)?", ln.strip())]
    assert not odd, f"lines not of the form `METHOD /api/v1/path`: {odd[:5]}"


def shape(path):
    return re.sub(r"\{[^}/]+\}", "{}", path)


def test_openapi_needs_a_token_on_the_api_and_none_on_ops(env):
    # On the API listener the document is for signed-in users only (no
    # token: 401); the operations listener serves it to anyone who can
    # reach it, byte for byte the same.
    assert env.api.get("/openapi.yaml").status == 401
    st, ops_text = env.p.http("/openapi.yaml")
    assert st == 200, st
    r, doc = served_openapi(env)
    assert yaml.safe_load(ops_text) == doc
    ctype = (r.header("Content-Type") or "").split(";")[0].strip()
    assert ctype == "application/yaml", f"Content-Type {ctype!r}"
    check_security_headers(r)
    assert isinstance(doc, dict) and str(doc.get("openapi", "")).startswith("3."), doc.keys()
    servers = [s.get("url", "") for s in doc.get("servers") or []]
    assert any(u.rstrip("/").endswith("/api/v1") for u in servers), servers
    on_disk = yaml.safe_load((REPO / "docs" / "openapi.yaml").read_text())
    assert doc == on_disk, "served OpenAPI document differs from docs/openapi.yaml"


def test_openapi_documents_every_route(env):
    documented = documented_routes(yaml.safe_load((REPO / "docs" / "openapi.yaml").read_text()))
    routed = cli_routes(env)
    assert routed, "no /api/v1 routes from `fleetml api routes`"
    missing_doc = sorted(routed - documented)
    missing_route = sorted(documented - routed)
    assert not missing_doc and not missing_route, (
        f"routed but not documented: {missing_doc}\ndocumented but not routed: {missing_route}")


def test_contract_endpoints_are_routed(env):
    routed = {(m, shape(p)) for m, p in cli_routes(env)}
    missing = sorted(SPEC_ROUTES - routed)
    assert not missing, f"endpoints of the contract with no route: {missing}"


def test_openapi_operations_well_formed(env):
    _, doc = served_openapi(env)
    problems = []
    for path, ops in doc["paths"].items():
        params_in_path = set(re.findall(r"\{([^}/]+)\}", path))
        shared = ops.get("parameters", [])
        for m, op in ops.items():
            if m.upper() not in METHODS:
                continue
            if not isinstance(op.get("responses"), dict) or not op["responses"]:
                problems.append(f"{m.upper()} {path}: no responses")
            declared = {p.get("name") for p in shared + op.get("parameters", [])
                        if isinstance(p, dict) and p.get("in") == "path"}
            # $ref'd parameters cannot be checked without resolving; skip them.
            has_refs = any("$ref" in p for p in shared + op.get("parameters", [])
                           if isinstance(p, dict))
            if not has_refs and params_in_path - declared:
                problems.append(f"{m.upper()} {path}: path parameters "
                                f"{params_in_path - declared} not declared")
    assert not problems, "\n".join(problems)


def test_routes_answer_as_routed(env):
    # Every routed (method, path) answers something other than 404/405 for
    # an admin (with dummy path parameters; 404 "not_found" for a missing
    # object is fine only where the path names an object).
    t = tok(env, "admin")
    wrong = []
    for method, path in sorted(cli_routes(env)):
        concrete = re.sub(r"\{[^}/]+\}", "zz-none", path)
        body = {} if method in ("POST", "PUT", "PATCH") else None
        if path.endswith("/events") and "{" not in path:
            # A live stream never ends: only its status line is read.
            stream = EventStream(env.api, concrete, t)
            stream.close()
            r = stream
        else:
            r = env.api.request(method, concrete, body=body, token=t)
        if r.status == 405:
            wrong.append((method, path, r))
        elif r.status == 404 and "{" not in path:
            wrong.append((method, path, r))
    assert not wrong, "routed but answered as unrouted:\n" + "\n".join(map(str, wrong))


def test_unauthenticated_routes(env):
    # Everything but auth requires a token.  A
    # JSON body is sent where the OpenAPI document declares one.
    _, doc = served_openapi(env)
    takes_body = {(m.upper(), p) for p, ops in doc["paths"].items() for m, op in ops.items()
                  if m.upper() in METHODS and isinstance(op, dict) and "requestBody" in op}
    wrong = []
    for method, path in sorted(cli_routes(env)):
        if path.startswith("/auth/"):
            continue
        concrete = re.sub(r"\{[^}/]+\}", "zz-none", path)
        body = {} if (method, path) in takes_body else None
        r = env.api.request(method, concrete, body=body)
        if r.status != 401:
            wrong.append((method, path, r))
        else:
            check_unauthorized(r)
    assert not wrong, "answered without a token:\n" + "\n".join(map(str, wrong))
