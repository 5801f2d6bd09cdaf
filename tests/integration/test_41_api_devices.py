"""HTTP API v1: devices (list, get, presence, disable/enable/revoke),
shadow, templates and claim certificates, tenant isolation
(docs/openapi.yaml: Devices, Templates, 404 for other tenants)."""

import subprocess
import time
from types import SimpleNamespace

import pytest

from api_client import (Api, Users, add_user, check_error, check_page, is_rfc3339_ms,
                        ms_of)
from helpers import TENANT, Device, cert_info, wait_for

OTHER = "dev-other-tenant"
DEVICES = ["dv-online", "dv-disable", "dv-revoke", "dv-shadow", "dv-roles", "dv-final"]
OTHER_DEVICE = "ot-device"
DEVICE_FIELDS = {"id", "tenant", "status", "group", "serial_number", "model", "firmware",
                 "created_at", "online", "last_seen"}


@pytest.fixture(scope="module")
def env(module_platform):
    pw = {}

    def setup(p):
        for name, roles in (("clin", "clinician"), ("sci", "data_scientist"),
                            ("devm", "device_manager")):
            pw[(TENANT, name)] = add_user(p, name, roles)
        pw[(OTHER, "oadmin")] = add_user(p, "oadmin", "admin", tenant=OTHER,
                                         create_tenant=True)
        p.run("device", "add", OTHER_DEVICE, "--tenant", OTHER, "--data", str(p.data))

    p = module_platform("apidev", devices=DEVICES, setup=setup)
    api = Api(p)
    users = Users(api)
    users.add("admin", p.admin_password)
    for (t, n), v in pw.items():
        users.add(n, v, tenant=t)
    return SimpleNamespace(p=p, api=api, users=users)


def tok(env, user, tenant=TENANT):
    return env.users.token(user, tenant=tenant)


def get_device(env, device_id, user="admin"):
    return env.api.ok("GET", f"/devices/{device_id}", tok(env, user))


def check_device(d, device_id=None, tenant=TENANT):
    assert set(d) >= DEVICE_FIELDS, f"device object lacks {DEVICE_FIELDS - set(d)}: {d}"
    if device_id is not None:
        assert d["id"] == device_id, d
    assert d["tenant"] == tenant, d
    assert d["status"] in ("active", "disabled", "revoked"), d
    assert isinstance(d["online"], bool), d
    assert d["last_seen"] is None or is_rfc3339_ms(d["last_seen"]), d
    assert is_rfc3339_ms(d["created_at"]), d


def try_connect(p, device_id):
    d = Device(p, device_id)
    try:
        return d.try_connect(timeout=5)
    finally:
        d.close()


def refused(outcome):
    return outcome not in ("connected", "timeout")


# --------------------------------------------------------------------------
# Listing and reading


@pytest.mark.parametrize("user", ["admin", "clin", "sci", "devm"])
def test_list_devices_paged(env, user):
    pages = env.api.pages("/devices", tok(env, user), limit=2)
    sizes = [len(pg["items"]) for pg in pages]
    # Full pages of 2; a final empty page after an exactly full one is
    # tolerated (the contract does not say the server must look ahead).
    assert sizes[:3] == [2, 2, 2] and all(n == 0 for n in sizes[3:]) and len(sizes) <= 4, sizes
    ids = [d["id"] for pg in pages for d in pg["items"]]
    assert ids == sorted(DEVICES), f"expected the tenant's devices in id order, got {ids}"
    for pg in pages:
        for d in pg["items"]:
            check_device(d)
    # One page with the default limit holds them all.
    one = env.api.ok("GET", "/devices", tok(env, user))
    check_page(one)
    assert [d["id"] for d in one["items"]] == sorted(DEVICES) and one["next_cursor"] is None


def test_get_device(env):
    d = get_device(env, "dv-roles")
    check_device(d, "dv-roles")
    assert d["status"] == "active", d
    check_error(env.api.get("/devices/no-such-device", token=tok(env, "admin")), 404,
                "not_found")


def test_device_goes_online_then_offline(env):
    before = get_device(env, "dv-online", "clin")
    assert before["online"] is False, before
    t0 = time.time()
    d = Device(env.p, "dv-online").connect()
    try:
        on = wait_for(lambda: (lambda x: x if x["online"] else None)(
            get_device(env, "dv-online", "clin")), 10, interval=0.1,
            msg="GET /devices/dv-online to say online")
        check_device(on, "dv-online")
        assert on["last_seen"] is not None, on
        assert ms_of(on["last_seen"]) >= int(t0 * 1000) - 1000, (on, t0)
    finally:
        d.close()
    off = wait_for(lambda: (lambda x: x if not x["online"] else None)(
        get_device(env, "dv-online", "clin")), 10, interval=0.1,
        msg="GET /devices/dv-online to say offline after disconnect")
    assert off["last_seen"] is not None, off
    assert ms_of(off["last_seen"]) >= ms_of(on["last_seen"]), (on, off)
    # The list agrees.
    listed = {x["id"]: x for x in env.api.ok("GET", "/devices", tok(env, "clin"))["items"]}
    assert listed["dv-online"]["online"] is False and listed["dv-online"]["last_seen"]


# --------------------------------------------------------------------------
# Disable / enable / revoke


def test_disable_enable(env):
    devm = tok(env, "devm")
    live = Device(env.p, "dv-disable").connect()     # control: connects while active
    try:
        r = env.api.post("/devices/dv-disable/disable", token=devm)
        t_done = time.monotonic()
        assert r.status == 200, r
        d = r.json()
        lost = live.wait_lost(5)
        assert lost - t_done < 1.0, f"live session cut {lost - t_done:.3f}s after disable"
    finally:
        live.close()
    check_device(d, "dv-disable")
    assert d["status"] == "disabled", d
    assert get_device(env, "dv-disable")["status"] == "disabled"
    last = []

    def is_refused():
        last[:] = [try_connect(env.p, "dv-disable")]
        return refused(last[0])
    wait_for(is_refused, 2, interval=0.05, msg=f"disabled device refused (last {last})")
    d = env.api.ok("POST", "/devices/dv-disable/enable", devm)
    assert d["status"] == "active", d
    wait_for(lambda: try_connect(env.p, "dv-disable") == "connected", 3, interval=0.05,
             msg="re-enabled device accepted")


def test_revoke_cuts_live_session_and_is_final(env):
    dev = Device(env.p, "dv-revoke").connect()
    try:
        r = env.api.post("/devices/dv-revoke/revoke", token=tok(env, "admin"))
        t_done = time.monotonic()
        assert r.status == 200, r
        assert r.json()["status"] == "revoked", r.json()
        lost = dev.wait_lost(5)
        print(f"session cut {lost - t_done:+.3f}s after the revoke answered")
        assert lost - t_done < 1.0, f"live session cut {lost - t_done:.3f}s after revoke"
    finally:
        dev.close()
    assert refused(try_connect(env.p, "dv-revoke")), "revoked device accepted"
    r = env.api.post("/devices/dv-revoke/enable", token=tok(env, "admin"))
    check_error(r, 409, "conflict")
    assert get_device(env, "dv-revoke")["status"] == "revoked"
    assert refused(try_connect(env.p, "dv-revoke")), "revoked device accepted after enable"


def test_revoke_disabled_device_then_enable_409(env):
    admin = tok(env, "admin")
    env.api.ok("POST", "/devices/dv-final/disable", admin)
    d = env.api.ok("POST", "/devices/dv-final/revoke", admin)
    assert d["status"] == "revoked", d
    check_error(env.api.post("/devices/dv-final/enable", token=admin), 409, "conflict")


def test_device_manage_roles(env):
    for user in ("clin", "sci"):
        for action in ("disable", "enable", "revoke"):
            r = env.api.post(f"/devices/dv-roles/{action}", token=tok(env, user))
            check_error(r, 403, "forbidden")
    assert get_device(env, "dv-roles")["status"] == "active"
    d = env.api.ok("POST", "/devices/dv-roles/disable", tok(env, "admin"))
    assert d["status"] == "disabled", d
    d = env.api.ok("POST", "/devices/dv-roles/enable", tok(env, "devm"))
    assert d["status"] == "active", d
    check_error(env.api.post("/devices/no-such-device/disable", token=tok(env, "devm")), 404,
                "not_found")


# --------------------------------------------------------------------------
# Tenant isolation


def test_other_tenant_sees_only_its_devices(env):
    otok = tok(env, "oadmin", OTHER)
    theirs = env.api.ok("GET", "/devices", otok)
    assert [d["id"] for d in theirs["items"]] == [OTHER_DEVICE], theirs
    check_device(theirs["items"][0], OTHER_DEVICE, tenant=OTHER)
    for path in ("/devices/dv-online", "/devices/dv-online/shadow"):
        check_error(env.api.get(path, token=otok), 404, "not_found")
    check_error(env.api.post("/devices/dv-roles/disable", token=otok), 404, "not_found")
    check_error(env.api.patch("/devices/dv-shadow/shadow", {"desired": {"x": 1}}, token=otok),
                404, "not_found")
    assert get_device(env, "dv-roles")["status"] == "active"


def test_device_of_other_tenant_is_404(env):
    for user in ("admin", "clin", "devm"):
        t = tok(env, user)
        check_error(env.api.get(f"/devices/{OTHER_DEVICE}", token=t), 404, "not_found")
        check_error(env.api.get(f"/devices/{OTHER_DEVICE}/shadow", token=t), 404, "not_found")
    admin = tok(env, "admin")
    for action in ("disable", "revoke"):
        check_error(env.api.post(f"/devices/{OTHER_DEVICE}/{action}", token=admin), 404,
                    "not_found")
    check_error(env.api.patch(f"/devices/{OTHER_DEVICE}/shadow", {"desired": {"x": 1}},
                              token=admin), 404, "not_found")
    check_error(env.api.get(f"/devices/{OTHER_DEVICE}/measurements", token=tok(env, "clin")),
                404, "not_found")
    # Untouched: the owner still sees it active with an empty desired state.
    otok = tok(env, "oadmin", OTHER)
    assert env.api.ok("GET", f"/devices/{OTHER_DEVICE}", otok)["status"] == "active"
    assert env.api.ok("GET", f"/devices/{OTHER_DEVICE}/shadow", otok)["desired"] == {}


# --------------------------------------------------------------------------
# Shadow


def check_shadow(s):
    assert set(s) >= {"desired", "reported", "version", "updated_at", "delta"}, s
    assert isinstance(s["desired"], dict) and isinstance(s["reported"], dict), s
    assert isinstance(s["delta"], dict), s
    assert isinstance(s["version"], int) and not isinstance(s["version"], bool), s
    assert s["updated_at"] is None or is_rfc3339_ms(s["updated_at"]), s
    return s


def test_shadow_get_patch(env):
    devm, clin = tok(env, "devm"), tok(env, "clin")
    s0 = check_shadow(env.api.ok("GET", "/devices/dv-shadow/shadow", clin))
    assert s0["desired"] == {} and s0["reported"] == {}, s0

    d = Device(env.p, "dv-shadow").connect()
    try:
        for leaf in ("delta", "document"):
            assert all(c < 0x80 for c in d.subscribe(f"fleet/dv-shadow/shadow/{leaf}"))
        since = d.mark()
        s1 = check_shadow(env.api.ok("PATCH", "/devices/dv-shadow/shadow", devm,
                                     {"desired": {"rate": 5, "cfg": {"a": 1, "b": 1}}}))
        assert s1["desired"] == {"rate": 5, "cfg": {"a": 1, "b": 1}}, s1
        assert s1["version"] > s0["version"], (s0, s1)
        assert s1["delta"] == {"rate": 5, "cfg": {"a": 1, "b": 1}}, s1
        assert is_rfc3339_ms(s1["updated_at"]), s1
        m = d.wait_message(lambda m: m.topic == "fleet/dv-shadow/shadow/delta", 5, since,
                           "shadow delta on MQTT after PATCH")
        assert m.json().get("state") == {"rate": 5, "cfg": {"a": 1, "b": 1}}, m.json()

        # The device reports part of it; the delta shrinks.
        since = d.mark()
        d.publish({"reported": {"rate": 5, "cfg": {"a": 1}}},
                  topic="fleet/dv-shadow/shadow/update")
        d.wait_message(lambda m: m.topic == "fleet/dv-shadow/shadow/document", 5, since,
                       "shadow document after the report")
        s2 = check_shadow(env.api.ok("GET", "/devices/dv-shadow/shadow", clin))
        assert s2["reported"] == {"rate": 5, "cfg": {"a": 1}}, s2
        assert s2["delta"] == {"cfg": {"b": 1}}, s2

        # JSON merge patch: null deletes, objects merge.
        s3 = check_shadow(env.api.ok("PATCH", "/devices/dv-shadow/shadow", tok(env, "admin"),
                                     {"desired": {"rate": None, "cfg": {"c": 3}}}))
        assert s3["desired"] == {"cfg": {"a": 1, "b": 1, "c": 3}}, s3
        assert s3["version"] > s2["version"], (s2, s3)
        assert s3["delta"] == {"cfg": {"b": 1, "c": 3}}, s3
        assert check_shadow(env.api.ok("GET", "/devices/dv-shadow/shadow", clin)) == s3
    finally:
        d.close()


def test_shadow_patch_refusals(env):
    before = env.api.ok("GET", "/devices/dv-shadow/shadow", tok(env, "admin"))
    for user in ("clin", "sci"):
        r = env.api.patch("/devices/dv-shadow/shadow", {"desired": {"x": 1}},
                          token=tok(env, user))
        check_error(r, 403, "forbidden")
    for body in ({}, {"desired": 5}, {"desired": [1, 2]}):
        r = env.api.patch("/devices/dv-shadow/shadow", body, token=tok(env, "devm"))
        check_error(r, 400, "invalid_request")
    check_error(env.api.patch("/devices/no-such-device/shadow", {"desired": {"x": 1}},
                              token=tok(env, "devm")), 404, "not_found")
    # Free-form states nest at most 16 levels (desired itself is the first).
    deep = {"x": 1}
    for _ in range(16):
        deep = {"d": deep}
    check_error(env.api.patch("/devices/dv-shadow/shadow", {"desired": deep},
                              token=tok(env, "devm")), 422, "validation_failed")
    after = env.api.ok("GET", "/devices/dv-shadow/shadow", tok(env, "admin"))
    assert after["version"] == before["version"] and after["desired"] == before["desired"]


# --------------------------------------------------------------------------
# Templates and claim certificates


TEMPLATE_FIELDS = {"name", "tenant", "group", "device_prefix", "cert_days",
                   "allow_reprovision", "rate_per_min", "status", "has_allowlist", "hook",
                   "created_at"}


def openssl_text(args, pem):
    r = subprocess.run(["openssl", *args], input=pem, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, f"openssl {' '.join(args)}: {r.stderr}\n{pem[:200]}"
    return r.stdout


def test_templates_create_list(env):
    admin = tok(env, "admin")
    first = env.api.ok("GET", "/templates", admin)
    check_page(first)
    assert first["next_cursor"] is None, first
    t = env.api.ok("POST", "/templates", admin, {
        "name": "ward-api", "group": "ward3", "device_prefix": "w3", "cert_days": 30,
        "allow_reprovision": True, "rate_per_min": 12, "serials": ["SN-1", "SN-2"]},
        status=201)
    assert set(t) >= TEMPLATE_FIELDS, f"template lacks {TEMPLATE_FIELDS - set(t)}: {t}"
    assert (t["name"], t["tenant"], t["group"], t["device_prefix"], t["cert_days"],
            t["allow_reprovision"], t["rate_per_min"], t["status"], t["has_allowlist"]) == (
        "ward-api", TENANT, "ward3", "w3", 30, True, 12, "active", True), t
    assert is_rfc3339_ms(t["created_at"]), t

    plain = env.api.ok("POST", "/templates", admin, {"name": "plain-api"}, status=201)
    assert plain["has_allowlist"] is False and plain["status"] == "active", plain
    assert plain["tenant"] == TENANT, plain

    check_error(env.api.post("/templates", {"name": "ward-api"}, token=admin), 409, "conflict")
    listed = env.api.ok("GET", "/templates", admin)
    by_name = {x["name"]: x for x in listed["items"]}
    assert {"ward-api", "plain-api"} <= set(by_name), listed
    assert by_name["ward-api"] == t, (by_name["ward-api"], t)
    # Another tenant neither sees nor reaches them.
    otok = tok(env, "oadmin", OTHER)
    assert not [x for x in env.api.ok("GET", "/templates", otok)["items"]
                if x["name"] in ("ward-api", "plain-api")]
    check_error(env.api.post("/templates/ward-api/claim-cert", token=otok), 404, "not_found")


@pytest.mark.parametrize("body", [{}, {"name": "Bad Name!"}, {"name": "ok-name",
                                                              "cert_days": "many"}],
                         ids=["no-name", "bad-name", "bad-days"])
def test_template_invalid(env, body):
    r = env.api.post("/templates", body, token=tok(env, "admin"))
    assert r.status in (400, 422), r
    check_error(r, r.status, "invalid_request" if r.status == 400 else "validation_failed")


def test_template_roles(env):
    for user in ("devm", "clin", "sci"):
        t = tok(env, user)
        check_error(env.api.get("/templates", token=t), 403, "forbidden")
        check_error(env.api.post("/templates", {"name": f"by-{user}"}, token=t), 403,
                    "forbidden")
        check_error(env.api.post("/templates/ward-api/claim-cert", token=t), 403, "forbidden")


def test_claim_cert(env, tmp_path):
    admin = tok(env, "admin")
    name = "claim-api"
    env.api.ok("POST", "/templates", admin, {"name": name}, status=201)
    c1 = env.api.ok("POST", f"/templates/{name}/claim-cert", admin, status=201)
    assert set(c1) >= {"serial", "certificate_pem", "private_key_pem", "ca_pem"}, c1.keys()
    serial, cn = cert_info(c1["certificate_pem"])
    assert cn == f"claim:{name}", f"claim certificate CN {cn!r}"
    subj = openssl_text(["x509", "-noout", "-subject", "-nameopt", "RFC2253"],
                        c1["certificate_pem"])
    assert f"CN=claim:{name}" in subj, subj
    # The serial the API names is the certificate's.
    sn = str(c1["serial"]).replace(":", "").lower()
    assert int(sn, 16) == serial or (sn.isdigit() and int(sn) == serial), (c1["serial"], serial)
    # The key belongs to the certificate.
    cert_pub = openssl_text(["x509", "-noout", "-pubkey"], c1["certificate_pem"])
    key_pub = openssl_text(["pkey", "-pubout"], c1["private_key_pem"])
    assert cert_pub.strip() == key_pub.strip(), "private key does not match the certificate"
    # The CA is the platform's and it signed the certificate.
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(c1["ca_pem"])
    ca_subj = openssl_text(["x509", "-noout", "-subject"], c1["ca_pem"])
    plat_subj = openssl_text(["x509", "-noout", "-subject"],
                             (env.p.data / "pki" / "ca.crt").read_text())
    assert ca_subj == plat_subj, (ca_subj, plat_subj)
    crt_file = tmp_path / "claim.pem"
    crt_file.write_text(c1["certificate_pem"])
    r = subprocess.run(["openssl", "verify", "-CAfile", str(ca_file), str(crt_file)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"claim certificate does not verify against ca_pem: {r.stderr}"
    # A new certificate each call.
    c2 = env.api.ok("POST", f"/templates/{name}/claim-cert", admin, status=201)
    assert cert_info(c2["certificate_pem"])[0] != serial, "same serial twice"
    assert c2["private_key_pem"] != c1["private_key_pem"]
    check_error(env.api.post("/templates/no-such-template/claim-cert", token=admin), 404,
                "not_found")
