"""Rules and functions (docs/functions.md): events from committed data,
jq filters and transforms, and the targets a rule delivers to.

- a rule on result.produced whose jq filter keeps only low hematocrits
  posts exactly those results, transformed, to a webhook, signed with
  HMAC-SHA256 over "<timestamp>.<body>", with the event id in a header;
- a failing webhook is retried (with backoff) and, after the last retry,
  the event goes to the lake's dead-letter area with the error; the rule
  then carries on with the next event;
- device.online reaches a lake target; result.produced can set the
  device's shadow (desired state);
- a processor function answers the devices of its group in the reply path
  instead of the model: the reply names it, its outputs are the result, the
  result is stored before the reply, other groups keep the model, and a
  processor that fails costs only that measurement (its device is told to
  retry; nothing of it is stored);
- a function deployed in <data>/functions is called warm by a rule
  (invocation log, GET /functions counters); the example functions (C,
  Python) answer through `fleetml function call`, and the jq-only example
  rule loads;
- the API checks rule documents (jq that does not compile, a plain-http
  webhook off loopback), never shows a webhook's secret, and keeps rules
  to their tenant and to the roles allowed to manage them.
"""

import hashlib
import hmac
import json
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from api_client import Api, add_user
from helpers import (Device, check_against_schema, make_csr, make_measurement, make_sweep,
                     model_dir, unique_id, wait_for)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "functions"
SECRET = "a-webhook-secret-of-some-length"
OTHER = "rules-other-hospital"


class Hook:
    """A webhook receiver on loopback: records every POST; answers
    `status` (a list is consumed one answer per request, then 200)."""

    def __init__(self):
        self.calls = []
        self.status = []
        self.cond = threading.Condition()
        hook = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with hook.cond:
                    code = hook.status.pop(0) if hook.status else 200
                    hook.calls.append((self.path, dict(self.headers), body, code))
                    hook.cond.notify_all()
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def on(self, path):
        with self.cond:
            return [c for c in self.calls if c[0] == path]

    def close(self):
        self.server.shutdown()


def deploy(p, name, src_dir, extra=None):
    """Copies an example function into <data>/functions/<name>."""
    dst = p.data / "functions" / name
    shutil.copytree(src_dir, dst)
    if extra:
        for f, target in extra.items():
            shutil.copy(target, dst / f)
    return dst


@pytest.fixture(scope="module")
def env(module_platform):
    pw = {}

    def setup(p):
        pw["admin2"] = add_user(p, "rules-admin", "admin")
        pw["sci"] = add_user(p, "rules-sci", "data_scientist")
        p.run("template", "add", "rules-tpl", "--tenant", "demo-hospital", "--data", str(p.data))
        p.run("template", "claim-cert", "rules-tpl", "--data", str(p.data))
        pw["clin"] = add_user(p, "rules-clin", "clinician")
        pw["oadmin"] = add_user(p, "rules-oadmin", "admin", tenant=OTHER, create_tenant=True)
        p.run("device", "add", "rules-other-dev", "--data", str(p.data), "--tenant", OTHER)
        (p.data / "functions").mkdir()
        deploy(p, "ward-note", EXAMPLES / "python-ward-note")
        build = Path(p.bin).parent
        deploy(p, "range-check", EXAMPLES / "c-range-check",
               {"range_check": build / "range_check"})
        deploy(p, "krieger", EXAMPLES / "python-krieger-processor")
        p.run("device", "add", "rules-r", "--group", "research", "--data", str(p.data))

    p = module_platform("rules", devices=["rules-1", "rules-2"], setup=setup,
                        sets={"rules.retry_base_ms": "200", "rules.loopback_webhooks": "on"})
    hook = Hook()
    api = Api(p)
    tok = api.login("rules-admin", pw["admin2"])["access_token"]
    yield p, api, tok, hook, pw
    hook.close()


def put_rule(api, tok, rule, status=(200, 201)):
    r = api.request("PUT", f"/rules/{rule['name']}", body=rule, token=tok)
    assert r.status in status, r
    return r


def measure(p, device, scale=1.0):
    """One measurement whose torques are scaled (thinner blood below 1);
    returns (id, its result document)."""
    mid = unique_id()
    sweep = make_sweep(seed="fixed")
    for step in sweep:
        step["samples"] = [round(x * scale, 6) for x in step["samples"]]
    d = Device(p, device)
    try:
        d.connect()
        d.subscribe(d.results_topic)
        m, _ = d.measure(make_measurement(mid, sweep=sweep), timeout=15)
        doc = m.json()
        assert doc["status"] == "ok", doc
        return mid, doc
    finally:
        d.close()


START = []


def test_filtered_results_reach_a_signed_webhook(env):
    p, api, tok, hook, _ = env
    from api_client import rfc3339_of_ms
    START.append(rfc3339_of_ms(int(time.time() * 1000) - 1000))
    # What the model says for normal and for thin blood (before the rule).
    _, normal = measure(p, "rules-1")
    _, thin = measure(p, "rules-1", scale=0.55)
    hn, ht = normal["outputs"]["hematocrit_pct"], thin["outputs"]["hematocrit_pct"]
    assert ht < hn - 2, (ht, hn)
    cut = (hn + ht) / 2
    put_rule(api, tok, {
        "name": "low-hct", "event": "result.produced",
        "filter": f".data.outputs.hematocrit_pct < {cut}",
        "transform": "{device: .data.device, measurement: .data.measurement_id,"
                     " hct: .data.outputs.hematocrit_pct, event: .id}",
        "targets": [{"type": "webhook", "url": hook.url + "/low", "secret": SECRET}]})
    normal_id, _ = measure(p, "rules-1")
    thin_id, _ = measure(p, "rules-1", scale=0.55)
    other_id, _ = measure(p, "rules-2", scale=0.55)
    wait_for(lambda: len(hook.on("/low")) >= 2, 20, msg="two low results posted")
    got = [json.loads(c[2]) for c in hook.on("/low")]
    assert sorted(g["measurement"] for g in got) == sorted([thin_id, other_id]), got
    assert normal_id not in [g["measurement"] for g in got]
    for _, headers, body, _ in hook.on("/low"):
        ts = headers["X-Fleetml-Timestamp"]
        want = hmac.new(SECRET.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
        assert headers["X-Fleetml-Signature"] == f"sha256={want}"
        doc = json.loads(body)
        assert headers["X-Fleetml-Event-Id"] == doc["event"]
        assert doc["event"].startswith("result.produced:")
        assert headers["X-Fleetml-Event-Type"] == "result.produced"
        assert doc["hct"] < cut
    # The invocation log says what happened, newest first.
    # The log entry is written once the target has answered, so it may
    # trail the delivery the hook has already seen.
    wait_for(lambda: len(api.ok("GET", "/rules/low-hct/invocations", tok)["items"]) >= 2,
             20, msg="two invocations logged")
    log = api.ok("GET", "/rules/low-hct/invocations", tok)["items"]
    assert [x["outcome"] for x in log[:2]] == ["ok", "ok"], log
    assert {x["target"] for x in log} == {"webhook"}
    # Replayed from before the rule existed: every low result since then is
    # delivered again, the two before the rule included, with the same ids.
    first_ids = {h["X-Fleetml-Event-Id"] for _, h, _, _ in hook.on("/low")}
    r = api.request("POST", "/rules/low-hct/replay", token=tok, body={"from": START[0]})
    assert r.status == 202 and r.json()["rule"] == "low-hct", r
    wait_for(lambda: len(hook.on("/low")) >= 5, 20, msg="the replayed deliveries")
    again = [h["X-Fleetml-Event-Id"] for _, h, _, _ in hook.on("/low")[2:]]
    assert first_ids <= set(again) and len(again) == 3, again
    r = api.request("POST", "/rules/low-hct/replay", token=tok, body={"from": "yesterday"})
    assert r.status == 400


def test_failing_webhook_is_retried_then_dead_lettered(env):
    p, api, tok, hook, _ = env
    hook.status[:] = [500, 500, 500]  # the first try and both retries fail
    put_rule(api, tok, {
        "name": "flaky", "event": "result.produced", "retries": 2,
        "filter": '.data.device == "rules-2"',
        "targets": [{"type": "webhook", "url": hook.url + "/flaky", "secret": SECRET}]})
    first, _ = measure(p, "rules-2")

    def dead_letters():
        docs = [json.loads(p.lake_read(k)) for k in p.lake_objects("dead-letter")]
        return [d for d in docs if d["event"]["data"]["measurement_id"] == first]
    wait_for(dead_letters, 30, interval=0.2, msg="the event in the dead-letter area")
    mine = dead_letters()
    assert len(mine) == 1, mine
    assert mine[0]["rule"] == "flaky" and mine[0]["attempts"] == 3
    assert "HTTP 500" in mine[0]["error"], mine[0]
    check_against_schema("events/event.v1.json", mine[0]["event"])
    assert len(hook.on("/flaky")) == 3
    # Retried with backoff: the attempts are spread out (200 ms, then 400 ms).
    # The dead letter is logged just after it is written to the lake.
    wait_for(lambda: [x["outcome"] for x in api.ok(
        "GET", "/rules/flaky/invocations", tok)["items"]][:1] == ["dead-lettered"], 20,
        msg="the dead letter logged")
    log = api.ok("GET", "/rules/flaky/invocations", tok)["items"]
    assert [x["outcome"] for x in log][:4] == ["dead-lettered", "failed", "failed", "failed"]
    # The rule is not stuck: the next event is delivered.
    second, _ = measure(p, "rules-2")
    wait_for(lambda: any(json.loads(c[2])["data"]["measurement_id"] == second
                         for c in hook.on("/flaky") if c[3] == 200), 20,
             msg="the next event delivered")


def test_presence_to_the_lake_and_results_to_the_shadow(env):
    p, api, tok, _, _ = env
    put_rule(api, tok, {"name": "online-log", "event": "device.online",
                        "targets": [{"type": "lake", "prefix": "presence-log"}]})
    put_rule(api, tok, {"name": "last-hct", "event": "result.produced",
                        "filter": '.data.device == "rules-1"',
                        "transform": "{last_hct: .data.outputs.hematocrit_pct}",
                        "targets": [{"type": "shadow"}]})
    mid, res = measure(p, "rules-1")
    wait_for(lambda: p.lake_objects("presence-log"), 20, msg="a presence-log object")
    doc = json.loads(p.lake_read(p.lake_objects("presence-log")[-1]))
    assert doc["type"] == "device.online" and doc["data"]["device"] == "rules-1", doc
    check_against_schema("events/event.v1.json", doc)
    assert "/tenant=demo-hospital/" in str(p.lake_objects("presence-log")[-1])

    def shadow():
        return api.ok("GET", "/devices/rules-1/shadow", tok)["desired"].get("last_hct")
    wait_for(lambda: shadow() is not None, 20, msg="the shadow's desired state set")
    wait_for(lambda: abs(shadow() - res["outputs"]["hematocrit_pct"]) < 1e-6, 20,
             msg="the newest result in the shadow")


def test_function_target_called_warm(env):
    p, api, tok, _, _ = env
    fns = {f["name"]: f for f in api.ok("GET", "/functions", tok)["items"]}
    assert set(fns) == {"krieger", "range-check", "ward-note"}, fns
    assert fns["ward-note"]["workers"] >= 1  # warm before any event
    put_rule(api, tok, {"name": "note", "event": "result.produced",
                        "filter": '.data.device == "rules-2"',
                        "targets": [{"type": "function", "function": "ward-note"},
                                    {"type": "function", "function": "range-check"}]})
    measure(p, "rules-2")

    def delivered():
        log = api.ok("GET", "/rules/note/invocations", tok)["items"]
        return {x["target"] for x in log if x["outcome"] == "ok"}
    wait_for(lambda: delivered() == {"function:ward-note", "function:range-check"}, 20,
             msg="both functions called")
    fns = {f["name"]: f for f in api.ok("GET", "/functions", tok)["items"]}
    assert fns["ward-note"]["calls"] >= 1 and fns["range-check"]["calls"] >= 1, fns
    assert {"waited", "last_wait_us", "scaling_ahead"} <= set(fns["ward-note"]), fns
    metrics = p.metrics()
    assert 'fleetml_rule_deliveries_total{tenant="demo-hospital",rule="note",outcome="ok"}' \
        in metrics


def test_processor_function_in_the_reply_path(env):
    p, api, tok, _, _ = env
    import math
    mid, res = measure(p, "rules-r")
    assert res["model"] == "fn:krieger", res
    out = res["outputs"]
    assert set(out) == {"viscosity_high_mpas", "viscosity_low_mpas", "hematocrit_pct"}
    # Krieger-Dougherty from the sweep's own high-shear viscosity.
    want = 80.0 * (1 - math.sqrt(1.2 / out["viscosity_high_mpas"]))
    assert abs(out["hematocrit_pct"] - want) < 0.01, (out, want)
    assert 2.5 < out["viscosity_high_mpas"] < 8, out
    # Durable first: the stored result is the reply, and names the function.
    row = p.query("SELECT result, model FROM measurements WHERE device_id = ? AND"
                  " measurement_id = ?", "rules-r", mid)
    assert row and json.loads(row[0][0]) == res and row[0][1] == "fn:krieger", row
    # Another group keeps the model.
    _, other = measure(p, "rules-1")
    assert other["model"].startswith("viscosity@"), other
    # A processor that fails: that device is told to retry, nothing stored.
    bad = "fail-" + unique_id()
    d = Device(p, "rules-r")
    try:
        d.connect()
        d.subscribe(d.results_topic)
        m, _ = d.measure(make_measurement(bad), timeout=15)
    finally:
        d.close()
    doc = m.json()
    assert doc["status"] == "error" and doc["error"]["code"] == "internal", doc
    assert not p.query("SELECT 1 FROM measurements WHERE measurement_id = ?", bad)
    # ... and the next one is answered again.
    _, again = measure(p, "rules-r")
    assert again["model"] == "fn:krieger"
    fns = {f["name"]: f for f in api.ok("GET", "/functions", tok)["items"]}
    assert fns["krieger"]["calls"] >= 2 and fns["krieger"]["errors"] >= 1, fns


def test_provisioning_and_deployments_are_events(env, tmp_path):
    """device.provisioned when a device claims its identity, and
    model.deployed when an alias moves, each to a lake target."""
    import base64
    p, api, tok, _, pw = env
    put_rule(api, tok, {"name": "joined", "event": "device.provisioned",
                        "targets": [{"type": "lake", "prefix": "joined"}]})
    put_rule(api, tok, {"name": "deployed", "event": "model.deployed",
                        "transform": "{model: .data.model, alias: .data.alias,"
                                     " version: .data.version, share: .data.share_pct}",
                        "targets": [{"type": "lake", "prefix": "deployed"}]})
    # A device claims its identity with the template's claim certificate.
    cdir = p.data / "claims" / "rules-tpl"
    serial = "SN-RULES-" + unique_id("s")[-8:]
    _, csr = make_csr(tmp_path, "k", key="ec")
    c = Device(p, None, client_id=f"prov-{serial}", certfile=str(cdir / "claim.crt"),
               keyfile=str(cdir / "claim.key"))
    try:
        c.connect()
        base = f"fleet/provisioning/{c.client_id}"
        c.subscribe(base + "/accepted")
        since = c.mark()
        c.publish({"serial": serial, "csr": csr, "model": "it-visco", "firmware": "it-2.0"},
                  topic=base + "/request")
        m = c.wait_message(lambda m: m.topic == base + "/accepted", timeout=15, since=since,
                           what="accepted")
        dev_id = m.json()["device_id"]
    finally:
        c.close()
    wait_for(lambda: p.lake_objects("joined"), 20, msg="a device.provisioned object")
    doc = json.loads(p.lake_read(p.lake_objects("joined")[-1]))
    check_against_schema("events/event.v1.json", doc)
    assert doc["type"] == "device.provisioned" and doc["data"]["device"] == dev_id, doc
    assert doc["data"]["serial_number"] == serial and doc["id"].startswith("device.provisioned:")
    # A version approved and put on canary for 30 % of the devices.
    sci = api.login("rules-sci", pw["sci"])["access_token"]
    src = Path(model_dir())
    man = json.loads((src / "manifest.json").read_text())
    man["version"] = "1.0.9-rules"
    raw = base64.b64encode((src / "model.json").read_bytes()).decode()
    name = man["name"]
    r = api.post(f"/models/{name}/versions", {"manifest": man, "model": raw}, token=sci)
    assert r.status == 201, r
    api.ok("POST", f"/models/{name}/versions/1.0.9-rules/approve", sci, body={})
    r = api.request("PUT", f"/models/{name}/aliases/canary",
                    body={"version": "1.0.9-rules", "share_pct": 30}, token=sci)
    assert r.status == 200, r
    wait_for(lambda: p.lake_objects("deployed"), 20, msg="a model.deployed object")
    got = json.loads(p.lake_read(p.lake_objects("deployed")[-1]))
    assert got == {"model": name, "alias": "canary", "version": "1.0.9-rules", "share": 30}, got
    # Taken off: a second event, version null.
    api.request("PUT", f"/models/{name}/aliases/canary", body={"version": None}, token=sci)
    wait_for(lambda: len(p.lake_objects("deployed")) == 2, 20, msg="the removal's event")
    docs = [json.loads(p.lake_read(k)) for k in p.lake_objects("deployed")]
    assert sorted((d["alias"], d["version"] or "") for d in docs) == \
        [("canary", ""), ("canary", "1.0.9-rules")], docs
    assert any(d["version"] is None for d in docs), docs


def test_lake_objects_are_events(env):
    """lake.object.created once the export has published an object: the
    key in the event is readable, and holds the measurement that made it."""
    import gzip
    p, api, tok, hook, _ = env
    put_rule(api, tok, {"name": "objects", "event": "lake.object.created",
                        "filter": '.data.area == "raw"',
                        "targets": [{"type": "webhook", "url": hook.url + "/objects",
                                     "secret": SECRET}]})
    mid, _ = measure(p, "rules-2")

    def holding():
        for _, _, body, _ in hook.on("/objects"):
            ev = json.loads(body)
            path = p.data / "lake" / ev["data"]["key"]
            if mid.encode() in gzip.decompress(p.lake_read(path)):
                return ev
        return None
    wait_for(holding, 30, interval=0.2, msg="the event of the object holding the measurement")
    ev = holding()
    check_against_schema("events/event.v1.json", ev)
    assert ev["tenant"] == "demo-hospital" and ev["subject"] == "lake/" + ev["data"]["key"]
    assert ev["data"]["key"].startswith("raw/tenant=demo-hospital/"), ev
    assert ev["data"]["rows"] >= 1, ev
    # Each object is announced once.
    keys = [json.loads(b)["data"]["key"] for _, _, b, _ in hook.on("/objects")]
    assert len(keys) == len(set(keys)), keys


def test_example_functions_answer(env):
    p, _, _, _, _ = env
    event = {"id": "result.produced:1", "type": "result.produced", "data": {
        "device": "icu-1", "measurement_id": "m-1", "model": "viscosity@1.0.0",
        "outputs": {"hematocrit_pct": 61.5}}}
    r = subprocess.run([p.bin, "function", "call", "range-check", "--data", str(p.data)],
                       input=json.dumps(event), capture_output=True, text=True, timeout=60,
                       env=p.env, cwd=p.workdir)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"hematocrit_pct": 61.5, "out_of_range": True,
                                    "range": "high"}
    r = subprocess.run([p.bin, "function", "call", "ward-note", "--data", str(p.data)],
                       input=json.dumps(event), capture_output=True, text=True, timeout=60,
                       env=p.env, cwd=p.workdir)
    assert r.returncode == 0, r.stderr
    note = json.loads(r.stdout)
    assert note == {"ward": "icu-2", "device": "icu-1", "measurement": "m-1",
                    "text": "Hct 61.5 % (model viscosity@1.0.0)"}, note
    # The jq-only example rule is a valid rule as it is.
    r = p.run("rules", "put", str(EXAMPLES / "jq-out-of-range" / "rule.json"),
              "--tenant", OTHER, "--data", str(p.data))
    assert "hct-out-of-range created" in r.stdout


def test_rule_documents_checked_and_secrets_kept(env):
    p, api, tok, hook, pw = env
    bad = api.request("PUT", "/rules/bad", token=tok, body={
        "event": "result.produced", "filter": ".data | [",
        "targets": [{"type": "lake", "prefix": "x"}]})
    assert bad.status == 422 and "jq" in bad.json()["error"]["message"], bad
    r = api.request("PUT", "/rules/bad", token=tok, body={
        "event": "result.produced",
        "targets": [{"type": "webhook", "url": "http://his.example/hook", "secret": SECRET}]})
    assert r.status == 422 and "https" in r.json()["error"]["message"], r
    r = api.request("PUT", "/rules/bad", token=tok, body={
        "event": "no.such.event", "targets": [{"type": "lake", "prefix": "x"}]})
    assert r.status == 422, r
    shown = api.ok("GET", "/rules/low-hct", tok)
    assert shown["targets"][0]["secret"] == "********"
    assert SECRET not in json.dumps(api.ok("GET", "/rules", tok))
    # Another hospital's admin sees none of these rules and cannot touch them.
    otok = api.login("rules-oadmin", pw["oadmin"], tenant=OTHER)["access_token"]
    assert "low-hct" not in [x["name"] for x in api.ok("GET", "/rules", otok)["items"]]
    assert api.request("GET", "/rules/low-hct", token=otok).status == 404
    assert api.request("DELETE", "/rules/low-hct", token=otok).status == 404
    # A clinician may not manage rules.
    ctok = api.login("rules-clin", pw["clin"])["access_token"]
    assert api.request("GET", "/rules", token=ctok).status == 403
    # Deleting: gone, and its log with it.
    put_rule(api, tok, {"name": "short-lived", "event": "label.written",
                        "targets": [{"type": "lake", "prefix": "labels-copy"}]})
    assert api.request("DELETE", "/rules/short-lived", token=tok).status == 204
    assert api.request("GET", "/rules/short-lived", token=tok).status == 404
