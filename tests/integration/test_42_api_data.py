"""HTTP API v1: measurements (pages, cursors, time filters, one
measurement), labels (round trip, validation, lake export), models and
predict (same result as MQTT, not stored unless asked), audit (entries,
filters, lake export) (docs/openapi.yaml)."""

import json
import math
import re
import time
from types import SimpleNamespace

import pytest

from api_client import (Api, Users, add_user, check_error, check_page, contains_value,
                        is_rfc3339_ms, lake_records, ms_of, rfc3339_of_ms, urlquote)
from helpers import TENANT, encode, make_measurement, make_sweep, unique_id, wait_for

OTHER = "data-other-tenant"
DEVICES = ["dt-page", "dt-one", "dt-label", "dt-pred", "dt-store", "dt-audit", "dt-deny"]
OTHER_DEVICE = "od-device"
OUTPUTS = ("viscosity_high_mpas", "viscosity_low_mpas", "hematocrit_pct")


@pytest.fixture(scope="module")
def env(module_platform):
    pw = {}

    def setup(p):
        for name, roles in (("clin", "clinician"), ("sci", "data_scientist"),
                            ("devm", "device_manager"), ("aud-role", "clinician"),
                            ("aud-fail", "clinician")):
            pw[(TENANT, name)] = add_user(p, name, roles)
        pw[(OTHER, "oclin")] = add_user(p, "oclin", "clinician", tenant=OTHER,
                                        create_tenant=True)
        pw[(OTHER, "oadmin")] = add_user(p, "oadmin", "admin", tenant=OTHER)
        p.run("device", "add", OTHER_DEVICE, "--tenant", OTHER, "--data", str(p.data))

    p = module_platform("apidata", devices=DEVICES, setup=setup)
    api = Api(p)
    users = Users(api)
    users.add("admin", p.admin_password)
    for (t, n), v in pw.items():
        users.add(n, v, tenant=t)
    return SimpleNamespace(p=p, api=api, users=users)


def tok(env, user, tenant=TENANT):
    return env.users.token(user, tenant=tenant)


def now_ms():
    return int(time.time() * 1000)


def send(d, doc=None):
    """Publishes a measurement over MQTT; returns (doc, ok reply dict)."""
    doc = doc or make_measurement(unique_id(d.device_id))
    reply, _ = d.measure(doc)
    r = reply.json()
    assert r.get("status") == "ok", r
    return doc, r


def ids_of(api, path, token, limit=500):
    return [i["id"] for pg in api.pages(path, token, limit=limit) for i in pg["items"]]


# --------------------------------------------------------------------------
# Measurements


def test_measurements_page_newest_first(env, connected):
    d = connected(env.p, "dt-page")
    sent, replies, docs = [], {}, {}
    for _ in range(4):
        doc, r = send(d)
        sent.append(doc["id"])
        replies[doc["id"]], docs[doc["id"]] = r, doc
    batch1 = list(sent)
    t_mid = max(ms_of(replies[m]["received_at"]) for m in batch1) + 1
    # Everything after this point is received after t_mid (same clock).
    wait_for(lambda: now_ms() >= t_mid + 2, 2, interval=0.001, msg="the clock to pass t_mid")
    for _ in range(3):
        doc, r = send(d)
        sent.append(doc["id"])
        replies[doc["id"]], docs[doc["id"]] = r, doc
    batch2 = sent[4:]

    sci = tok(env, "sci")
    base = "/devices/dt-page/measurements"
    pages = env.api.pages(base, sci, limit=3)
    assert [len(pg["items"]) for pg in pages] == [3, 3, 1], pages
    assert pages[0]["next_cursor"] and pages[1]["next_cursor"], pages
    assert pages[2]["next_cursor"] is None, pages[2]
    items = [i for pg in pages for i in pg["items"]]
    ids = [i["id"] for i in items]
    assert len(set(ids)) == len(ids), f"duplicates across pages: {ids}"
    assert ids == list(reversed(sent)), f"expected newest first {list(reversed(sent))}, got {ids}"
    for i in items:
        assert set(i) >= {"id", "received_at", "taken_at", "model", "result"}, i
        r = replies[i["id"]]
        assert is_rfc3339_ms(i["received_at"]), i
        assert i["received_at"] == r["received_at"], (i, r)
        assert ms_of(i["taken_at"]) == ms_of(docs[i["id"]]["taken_at"]), i
        assert i["model"] == r["model"], (i, r)
        assert i["result"].get("outputs") == r["outputs"], (i, r)
        assert i["result"].get("status") == "ok" and i["result"].get("id") == i["id"], i
    recv = [ms_of(i["received_at"]) for i in items]
    assert recv == sorted(recv, reverse=True), recv

    # The same via the clinician, one page.
    one = env.api.ok("GET", base, tok(env, "clin"))
    check_page(one)
    assert [i["id"] for i in one["items"]] == ids and one["next_cursor"] is None

    # Time filters (integer milliseconds and RFC 3339).
    assert ids_of(env.api, f"{base}?from={t_mid}", sci, 2) == list(reversed(batch2))
    assert ids_of(env.api, f"{base}?to={t_mid}", sci, 2) == list(reversed(batch1))
    iso = urlquote(rfc3339_of_ms(t_mid))
    assert ids_of(env.api, f"{base}?from={iso}", sci) == list(reversed(batch2))
    assert ids_of(env.api, f"{base}?to={iso}", sci) == list(reversed(batch1))
    first = ms_of(replies[sent[0]]["received_at"])
    last = ms_of(replies[sent[-1]]["received_at"])
    assert ids_of(env.api, f"{base}?from={first}&to={last + 1}", sci) == list(reversed(sent))
    assert ids_of(env.api, f"{base}?from={last + 3600_000}", sci) == []


@pytest.mark.parametrize("query", ["from=yesterday", "to=2026-13-45T00:00:00Z",
                                   "limit=0", "limit=501", "limit=ten",
                                   "cursor=not-a-cursor%21%21"],
                         ids=["bad-from", "bad-to", "limit-0", "limit-501", "limit-text",
                              "bad-cursor"])
def test_measurements_bad_query_400(env, query):
    r = env.api.get(f"/devices/dt-page/measurements?{query}", token=tok(env, "sci"))
    check_error(r, 400, "invalid_request")


def test_get_one_measurement(env, connected):
    d = connected(env.p, "dt-one")
    doc, reply = send(d)
    mid = doc["id"]
    for user in ("clin", "sci"):
        m = env.api.ok("GET", f"/devices/dt-one/measurements/{mid}", tok(env, user))
        assert set(m) >= {"id", "device_id", "received_at", "taken_at", "model",
                          "measurement", "result", "label"}, m.keys()
        assert (m["id"], m["device_id"]) == (mid, "dt-one"), m
        assert m["received_at"] == reply["received_at"], (m["received_at"], reply)
        assert ms_of(m["taken_at"]) == ms_of(doc["taken_at"]), m["taken_at"]
        assert m["model"] == reply["model"], m
        assert m["measurement"] == json.loads(encode(doc)), "raw payload differs from sent"
        assert m["result"] == reply, f"result {m['result']} != MQTT reply {reply}"
        assert m["label"] is None, m["label"]
    check_error(env.api.get("/devices/dt-one/measurements/no-such-mid", token=tok(env, "clin")),
                404, "not_found")
    # A measurement id exists, but under another device.
    check_error(env.api.get(f"/devices/dt-page/measurements/{mid}", token=tok(env, "clin")),
                404, "not_found")
    for user in ("admin", "devm"):
        check_error(env.api.get(f"/devices/dt-one/measurements/{mid}", token=tok(env, user)),
                    403, "forbidden")
        check_error(env.api.get("/devices/dt-one/measurements", token=tok(env, user)),
                    403, "forbidden")


def test_measurements_other_tenant_404(env, connected):
    d = connected(env.p, "dt-deny")
    doc, _ = send(d)
    otok = tok(env, "oclin", OTHER)
    check_error(env.api.get("/devices/dt-deny/measurements", token=otok), 404, "not_found")
    check_error(env.api.get(f"/devices/dt-deny/measurements/{doc['id']}", token=otok), 404,
                "not_found")
    r = env.api.put(f"/devices/dt-deny/measurements/{doc['id']}/label",
                    {"outputs": {"hematocrit_pct": 40.0}, "source": "lab"}, token=otok)
    check_error(r, 404, "not_found")
    m = env.api.ok("GET", f"/devices/dt-deny/measurements/{doc['id']}", tok(env, "clin"))
    assert m["label"] is None, m
    check_error(env.api.get(f"/devices/{OTHER_DEVICE}/measurements", token=tok(env, "clin")),
                404, "not_found")


# --------------------------------------------------------------------------
# Labels


def test_label_roundtrip_and_lake(env, connected):
    d = connected(env.p, "dt-label")
    doc, _ = send(d)
    mid = doc["id"]
    clin = tok(env, "clin")
    path = f"/devices/dt-label/measurements/{mid}/label"
    outputs = {"viscosity_high_mpas": 4.25, "hematocrit_pct": 41.5}
    t0 = now_ms()
    lab = env.api.ok("PUT", path, clin, {"outputs": outputs, "source": "lab"})
    assert set(lab) >= {"outputs", "source", "labelled_by", "labelled_at"}, lab
    assert lab["outputs"] == outputs and lab["source"] == "lab", lab
    assert "clin" in str(lab["labelled_by"]), lab
    assert is_rfc3339_ms(lab["labelled_at"]), lab
    assert ms_of(lab["labelled_at"]) >= t0 - 1000, (lab, t0)
    got = env.api.ok("GET", f"/devices/dt-label/measurements/{mid}", tok(env, "sci"))
    assert got["label"] == lab, (got["label"], lab)

    def exported():
        return [(p, r) for p, r in lake_records(env.p, "labels")
                if mid in json.dumps(r) and contains_value(r, outputs)]
    recs = wait_for(exported, 20, interval=0.2, msg=f"the label of {mid} in lake/labels")
    p, _ = recs[0]
    rel = p.relative_to(env.p.data / "lake" / "labels").parts
    assert len(rel) == 4 and rel[0] == f"tenant={TENANT}", p
    assert re.fullmatch(r"date=\d{4}-\d{2}-\d{2}", rel[1]), p
    assert re.fullmatch(r"hour=\d{2}", rel[2]), p
    assert rel[3].endswith(".ndjson.gz"), p

    # Two quick corrections: the API shows the last, the lake gets both.
    lab2 = env.api.ok("PUT", path, clin, {"outputs": {"viscosity_low_mpas": 9.5},
                                          "source": "lab"})
    lab3 = env.api.ok("PUT", path, clin, {"outputs": {"viscosity_low_mpas": 9.75},
                                          "source": "lab"})
    assert lab2["outputs"] == {"viscosity_low_mpas": 9.5}, lab2
    got = env.api.ok("GET", f"/devices/dt-label/measurements/{mid}", clin)
    assert got["label"] == lab3, got["label"]

    def versions():
        vals = sorted(r["outputs"].get("viscosity_low_mpas") for _, r in
                      lake_records(env.p, "labels")
                      if r.get("measurement_id") == mid and "viscosity_low_mpas" in r["outputs"])
        return vals if vals == [9.5, 9.75] else None
    wait_for(versions, 20, interval=0.2, msg=f"both corrections of {mid} in lake/labels")


@pytest.mark.parametrize("outputs", [{}, {"no_such_output": 1.0}, {"hematocrit_pct": "high"},
                                     {"hematocrit_pct": None}, {"hematocrit_pct": [1]}],
                         ids=["empty", "unknown-output", "string", "null", "array"])
def test_label_validation_422(env, connected, outputs):
    d = connected(env.p, "dt-label")
    doc, _ = send(d)
    r = env.api.put(f"/devices/dt-label/measurements/{doc['id']}/label",
                    {"outputs": outputs, "source": "lab"}, token=tok(env, "clin"))
    check_error(r, 422, "validation_failed")
    m = env.api.ok("GET", f"/devices/dt-label/measurements/{doc['id']}", tok(env, "clin"))
    assert m["label"] is None, m


def test_label_refusals(env, connected):
    d = connected(env.p, "dt-label")
    doc, _ = send(d)
    path = f"/devices/dt-label/measurements/{doc['id']}/label"
    body = {"outputs": {"hematocrit_pct": 40.0}, "source": "lab"}
    for user in ("sci", "admin", "devm"):
        check_error(env.api.put(path, body, token=tok(env, user)), 403, "forbidden")
    check_error(env.api.put("/devices/dt-label/measurements/no-such-mid/label", body,
                            token=tok(env, "clin")), 404, "not_found")
    m = env.api.ok("GET", f"/devices/dt-label/measurements/{doc['id']}", tok(env, "clin"))
    assert m["label"] is None, m


def test_label_missing_outputs_400(env, connected):
    # A missing field is 400 invalid_request (errors table); 422 is for
    # outputs that are present but semantically wrong.
    d = connected(env.p, "dt-label")
    doc, _ = send(d)
    path = f"/devices/dt-label/measurements/{doc['id']}/label"
    check_error(env.api.put(path, {"source": "lab"}, token=tok(env, "clin")), 400,
                "invalid_request")


# --------------------------------------------------------------------------
# Models and predict


def test_models_list(env):
    doc = env.api.ok("GET", "/models", tok(env, "clin"))
    check_page(doc)
    assert doc["next_cursor"] is None, doc
    models = {m["name"]: m for m in doc["items"]}
    assert "viscosity" in models, doc
    v = models["viscosity"]
    assert isinstance(v["version"], str) and v["version"], v
    assert isinstance(v["features"], list) and v["features"], v
    names = [o["name"] for o in v["outputs"]]
    assert set(OUTPUTS) <= set(names), names
    for o in v["outputs"]:
        assert set(o) >= {"name", "unit", "min", "max"}, o
        assert o["min"] < o["max"], o


def test_predict_matches_mqtt_and_is_not_stored(env, connected):
    d = connected(env.p, "dt-pred")
    doc, reply = send(d)
    count = env.p.count_measurements("dt-pred")
    for user in ("clin", "sci"):
        r = env.api.post("/models/viscosity/predict", doc, token=tok(env, user))
        assert r.status == 200, r
        res = r.json()
        assert res.get("status") == "ok" and res.get("id") == doc["id"], res
        assert res.get("model") == reply["model"], (res, reply)
        assert set(res["outputs"]) == set(reply["outputs"]), (res, reply)
        for k, v in reply["outputs"].items():
            assert math.isclose(res["outputs"][k], v, rel_tol=1e-9, abs_tol=1e-9), (
                f"{k}: predict {res['outputs'][k]} vs MQTT {v}")
    # A fresh measurement predicted over HTTP is not stored anywhere.
    fresh = make_measurement(unique_id("pred-fresh"))
    r = env.api.post("/models/viscosity/predict", fresh, token=tok(env, "clin"))
    assert r.status == 200 and r.json()["status"] == "ok", r
    assert env.p.count_measurements("dt-pred") == count
    assert env.p.query("SELECT count(*) FROM measurements WHERE measurement_id = ?",
                       fresh["id"])[0][0] == 0, "predict without store=true stored it"
    ids = ids_of(env.api, "/devices/dt-pred/measurements", tok(env, "clin"))
    assert ids == [doc["id"]], ids


@pytest.mark.parametrize("name,build,code", [
    ("range", lambda mid: make_measurement(mid, sweep=make_sweep(rates=[50, 100, 200, 300])),
     "out_of_range"),
    ("missing", lambda mid: {k: v for k, v in make_measurement(mid).items()
                             if k != "taken_at"}, "missing_field"),
    ("unknown-field", lambda mid: make_measurement(mid, colour="red"), "unknown_field"),
    ("kind", lambda mid: make_measurement(mid, kind="viscosity.sweep.v9"), "unknown_kind"),
], ids=["range", "missing", "unknown-field", "kind"])
def test_predict_invalid_measurement_422(env, name, build, code):
    r = env.api.post("/models/viscosity/predict", build(unique_id(f"pred-{name}")),
                     token=tok(env, "clin"))
    check_error(r, 422, code)


def test_predict_unknown_model_and_roles(env):
    doc = make_measurement(unique_id("pred-x"))
    check_error(env.api.post("/models/no-such-model/predict", doc, token=tok(env, "clin")),
                404, "not_found")
    for user in ("admin", "devm"):
        check_error(env.api.post("/models/viscosity/predict", doc, token=tok(env, user)),
                    403, "forbidden")


def test_predict_store(env):
    sci = tok(env, "sci")
    doc = make_measurement(unique_id("pred-store"))
    url = "/models/viscosity/predict?store=true&device=dt-store"
    r = env.api.post(url, doc, token=sci)
    assert r.status == 200, r
    res = r.json()
    assert res.get("status") == "ok" and res.get("id") == doc["id"], res
    assert set(OUTPUTS) <= set(res.get("outputs", {})), res
    m = env.api.ok("GET", f"/devices/dt-store/measurements/{doc['id']}", sci)
    assert m["device_id"] == "dt-store" and m["measurement"] == json.loads(encode(doc)), m
    assert m["result"] == res, (m["result"], res)
    assert env.p.count_measurements("dt-store", doc["id"]) == 1
    # Deduplicated by measurement id.
    r2 = env.api.post(url, doc, token=sci)
    assert r2.status == 200, r2
    assert r2.json().get("outputs") == res["outputs"], (r2.json(), res)
    assert env.p.count_measurements("dt-store", doc["id"]) == 1
    assert ids_of(env.api, "/devices/dt-store/measurements", sci) == [doc["id"]]
    # Exported to the lake like any measurement.
    wait_for(lambda: [r for _, r in lake_records(env.p, "raw")
                      if r.get("measurement_id") == doc["id"]
                      and r.get("device_id") == "dt-store"], 20, interval=0.2,
             msg="the stored prediction in lake/raw")
    # The device must be in the caller's tenant (and exist).
    other = make_measurement(unique_id("pred-other"))
    for dev in (OTHER_DEVICE, "no-such-device"):
        r = env.api.post(f"/models/viscosity/predict?store=true&device={dev}", other,
                         token=sci)
        check_error(r, 404, "not_found")
    assert env.p.query("SELECT count(*) FROM measurements WHERE measurement_id = ?",
                       other["id"])[0][0] == 0


# --------------------------------------------------------------------------
# Audit


AUDIT_FIELDS = {"seq", "at", "tenant", "actor", "action", "target", "outcome", "client",
                "details"}


def check_audit_item(i):
    assert set(i) >= AUDIT_FIELDS, f"audit entry lacks {AUDIT_FIELDS - set(i)}: {i}"
    assert isinstance(i["seq"], int) and not isinstance(i["seq"], bool), i
    assert is_rfc3339_ms(i["at"]), i
    assert i["outcome"] in ("ok", "denied", "failed", "throttled"), i
    assert isinstance(i["details"], dict), i
    assert isinstance(i["client"], str) and isinstance(i["target"], str), i
    assert i["actor"] == "anonymous" or re.fullmatch(r"user:[^/]+/[^/]+", i["actor"]), i


def newest_seq(env, admin):
    items = env.api.ok("GET", "/audit?limit=1", admin)["items"]
    return items[0]["seq"] if items else 0


def audit_since(env, admin, mark, **filters):
    q = "&".join(f"{k}={urlquote(v)}" for k, v in filters.items())
    out = []
    for pg in env.api.pages(f"/audit?{q}" if q else "/audit", admin, limit=100):
        for i in pg["items"]:
            check_audit_item(i)
            for k, v in filters.items():
                if k in ("action", "actor"):
                    assert i[k] == v, f"filter {k}={v} returned {i}"
            if i["seq"] > mark:
                out.append(i)
    return out


def test_audit_entries(env, connected):
    admin = tok(env, "admin")
    clin_name = f"user:{TENANT}/clin"
    admin_name = f"user:{TENANT}/admin"
    d = connected(env.p, "dt-audit")
    doc, _ = send(d)
    mid = doc["id"]
    mark = newest_seq(env, admin)
    t0 = now_ms()

    # The actions.
    clin = env.users.token("clin", fresh=True)                      # auth.login ok
    r = Api(env.p, source="127.0.0.20").login_resp("aud-fail", "wrong-password-here")
    check_error(r, 401, "invalid_credentials")                      # auth.login failed
    env.api.ok("GET", f"/devices/dt-audit/measurements/{mid}", clin)  # measurement.read
    env.api.ok("PUT", f"/devices/dt-audit/measurements/{mid}/label", clin,
               {"outputs": {"hematocrit_pct": 39.0}, "source": "lab"})  # label.write
    env.api.ok("PUT", "/users/aud-role/roles", admin, {"roles": ["data_scientist"]})
    env.api.ok("POST", "/devices/dt-audit/revoke", admin)            # device.revoke
    check_error(env.api.get("/devices/dt-audit/measurements", token=tok(env, "devm")), 403,
                "forbidden")                                        # access.denied

    def one(action, pred, what):
        hits = [i for i in audit_since(env, admin, mark, action=action) if pred(i)]
        assert hits, f"no {action} audit entry {what}; new {action} entries: " + str(
            audit_since(env, admin, mark, action=action))
        for i in hits:
            assert i["tenant"] == TENANT, i
            assert ms_of(i["at"]) >= t0 - 1000, (i, t0)
        return hits[0]

    one("auth.login", lambda i: i["outcome"] == "ok" and i["actor"] == clin_name,
        "for clin's sign-in")
    failed = one("auth.login", lambda i: i["outcome"] == "failed", "for the failed sign-in")
    assert "127.0.0.20" in failed["client"], f"client of the failed sign-in: {failed}"
    one("measurement.read", lambda i: i["actor"] == clin_name and i["outcome"] == "ok"
        and (mid in i["target"] or "dt-audit" in i["target"]), f"for {mid}")
    one("label.write", lambda i: i["actor"] == clin_name and i["outcome"] == "ok"
        and (mid in i["target"] or "dt-audit" in i["target"]), f"for {mid}")
    one("user.roles", lambda i: i["actor"] == admin_name and "aud-role" in i["target"],
        "for aud-role")
    one("device.revoke", lambda i: i["actor"] == admin_name and "dt-audit" in i["target"]
        and i["outcome"] == "ok", "for dt-audit")
    one("access.denied", lambda i: i["actor"] == f"user:{TENANT}/devm"
        and i["outcome"] == "denied", "for devm's 403")

    # Actor filter.
    mine = audit_since(env, admin, mark, actor=clin_name)
    assert {"auth.login", "measurement.read", "label.write"} <= {i["action"] for i in mine}, mine
    # Time filters: nothing in the future; everything new is after t0 - 1 s.
    fut = env.api.ok("GET", f"/audit?from={now_ms() + 3600_000}", admin)
    assert fut["items"] == [], fut
    recent = [i["seq"] for i in audit_since(env, admin, mark)]
    windowed = [i["seq"] for i in audit_since(env, admin, mark, **{"from": str(t0 - 1000)})]
    assert windowed == recent, (windowed, recent)
    old = env.api.ok("GET", f"/audit?to={t0 - 3600_000}&limit=500", admin)
    assert not [i for i in old["items"] if i["seq"] > mark], old

    # Audit is admin's: a clinician cannot read it; the other tenant's
    # admin does not see this tenant's entries.
    check_error(env.api.get("/audit", token=clin), 403, "forbidden")
    theirs = env.api.ok("GET", "/audit?limit=500", tok(env, "oadmin", OTHER))
    assert not [i for i in theirs["items"] if i["tenant"] == TENANT], theirs["items"][:3]

    # Exported to the lake under logs/.
    def exported():
        return [(p, r) for p, r in lake_records(env.p, "logs")
                if r.get("action") == "label.write" and mid in json.dumps(r)]
    recs = wait_for(exported, 20, interval=0.2, msg="the label.write audit entry in lake/logs")
    rel = recs[0][0].relative_to(env.p.data / "lake" / "logs").parts
    assert rel[0] == f"tenant={TENANT}", recs[0][0]


def test_audit_covers_actions(env, connected):
    admin = tok(env, "admin")
    mark = newest_seq(env, admin)
    clin_s = env.users.new_session("clin")
    clin = clin_s["access_token"]
    env.api.ok("POST", "/users", admin, {"username": "aud-new", "password":
                                         "Vb8#kLm2@xQz-aud", "roles": ["clinician"]},
               status=201)                                              # user.create
    env.api.ok("POST", "/users/aud-new/disable", admin)                 # user.disable
    env.api.ok("POST", "/users/aud-new/enable", admin)                  # user.enable
    env.api.ok("POST", "/devices/dt-deny/disable", admin)               # device.disable
    env.api.ok("POST", "/devices/dt-deny/enable", admin)                # device.enable
    env.api.ok("PATCH", "/devices/dt-deny/shadow", admin, {"desired": {"k": 1}})
    env.api.ok("POST", "/templates", admin, {"name": "aud-tpl"}, status=201)
    env.api.ok("POST", "/templates/aud-tpl/claim-cert", admin, status=201)
    env.api.ok("GET", "/devices", clin)                                 # device.list
    env.api.ok("GET", "/devices/dt-deny/measurements", clin)            # measurement.list
    env.api.ok("POST", "/models/viscosity/predict", clin,
               make_measurement(unique_id("aud-pred")))                 # model.predict
    r = env.api.refresh(clin_s["refresh_token"])                        # auth.refresh
    assert r.status == 200, r
    assert env.api.logout(r.json()["refresh_token"]).status == 204      # auth.logout
    pw = env.users.passwords[(TENANT, "aud-role")]
    s = env.users.new_session("aud-role")
    env.api.ok("POST", "/me/password", s["access_token"],
               {"current_password": pw, "new_password": "Zt5^pWq9!rNe-aud"},
               status=204)                                              # user.password
    env.users.add("aud-role", "Zt5^pWq9!rNe-aud")
    want = ["user.create", "user.disable", "user.enable", "device.disable", "device.enable",
            "device.shadow", "template.create", "template.claim_cert", "device.list",
            "measurement.list", "model.predict", "auth.refresh", "auth.logout",
            "user.password"]
    new = audit_since(env, admin, mark)
    seen = {i["action"] for i in new if i["outcome"] == "ok"}
    missing = [a for a in want if a not in seen]
    assert not missing, f"no audit entry (outcome ok) for {missing}; got {sorted(seen)}"


def test_audit_pages_newest_first(env):
    admin = tok(env, "admin")
    pages = env.api.pages("/audit", admin, limit=2, max_pages=1000)
    seqs = [i["seq"] for pg in pages for i in pg["items"]]
    assert len(seqs) >= 4, seqs
    default = env.api.ok("GET", "/audit", admin)
    assert len(default["items"]) == min(50, len(seqs)), len(default["items"])
    assert (default["next_cursor"] is not None) == (len(seqs) > 50), default["next_cursor"]
    assert all(len(pg["items"]) <= 2 for pg in pages)
    assert len(set(seqs)) == len(seqs), "duplicates across audit pages"
    assert seqs == sorted(seqs, reverse=True), f"audit not newest first: {seqs[:20]}"
    everything = env.api.ok("GET", "/audit?limit=500", admin)
    assert [i["seq"] for i in everything["items"]] == seqs[:500]
    check_error(env.api.get("/audit?cursor=%7Bbroken", token=admin), 400, "invalid_request")
