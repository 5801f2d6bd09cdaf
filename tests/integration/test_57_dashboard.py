"""The web dashboard (docs/operations.md, "The dashboard"), in a real browser:
playwright-core (npm) drives Debian's chromium headless against `fleetml
serve` (tests/node/dashboard.mjs does the clicking and reports what it saw).

- a measurement sent while a device's page is open appears on it, plotted,
  pushed by the server (Server-Sent Events), without a reload;
- the fleet shows a device going online and offline as it happens (pushed
  too), with its certificate's end date;
- a label corrected on the page keeps its earlier value in the history;
- a user with a second factor is asked for the one-time code and gets in
  with it;
- the page and its assets come from the binary, with a strict CSP (no inline
  script, this origin only) and no console error;
- a wrong password gives a message; a device manager signs in and sees the
  fleet of the tenant, opens a device, sees its sweep plotted and the
  model's answer with units and plausible ranges;
- a firmware string carrying markup is shown as text, never run;
- disabling the device through the page (with a confirmation) disables it:
  the broker refuses it afterwards;
- a clinician of another hospital sees neither the device in the fleet nor
  its page;
- at tablet width the page does not scroll sideways.
"""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from api_client import Api, EventStream, add_user, totp
from helpers import Device, make_measurement, unique_id, wait_for

ROOT = Path(__file__).resolve().parents[2]
NODE = ROOT / "tests" / "node"
CHROMIUM = Path("/usr/bin/chromium")
XSS = "<script>alert(1)</script>"
OTHER = "other-hospital"


@pytest.fixture(scope="module")
def dash(module_platform):
    if not CHROMIUM.exists() or not (NODE / "node_modules" / "playwright-core").exists():
        pytest.fail("chromium or playwright-core missing: run scripts/install-deps",
                    pytrace=False)
    pw = {}

    def setup(p):
        pw["mgr"] = add_user(p, "mgr", "device_manager,clinician")
        pw["oclin"] = add_user(p, "oclin", "clinician", tenant=OTHER, create_tenant=True)
        pw["mfa"] = add_user(p, "mfa-clin", "clinician")
        p.run("device", "add", "other-dev", "--data", str(p.data), "--tenant", OTHER)

    p = module_platform("dash", devices=["dash-1"], setup=setup)
    # mfa-clin enrols a second factor, confirmed with the previous step's
    # code (accepted as clock drift) so the current step's is left for the
    # browser's sign-in.
    api = Api(p)
    wait_for(lambda: time.time() % 30 < 22, 10, interval=0.2, msg="a fresh TOTP step")
    tok = api.login("mfa-clin", pw["mfa"])["access_token"]
    r = api.post("/me/mfa/totp", {"current_password": pw["mfa"]}, token=tok)
    assert r.status == 201, r
    pw["mfa_secret"] = r.json()["secret"]
    api.ok("POST", "/me/mfa/totp/confirm", tok, body={"otp": totp(pw["mfa_secret"], -1)})
    dev = Device(p, "dash-1")
    try:
        dev.connect()
        dev.subscribe(dev.results_topic)
        for _ in range(2):
            m, _ = dev.measure(make_measurement(unique_id(), firmware=XSS), timeout=10)
            assert m.json()["status"] == "ok", m.json()
    finally:
        dev.close()
    return p, pw


def measure(p, device, firmware=XSS):
    mid = unique_id()
    dev = Device(p, device)
    try:
        dev.connect()
        dev.subscribe(dev.results_topic)
        m, _ = dev.measure(make_measurement(mid, firmware=firmware), timeout=10)
        assert m.json()["status"] == "ok", m.json()
    finally:
        dev.close()
    return mid


def browse(p, pw, screenshots=None):
    """Runs tests/node/dashboard.mjs, answering what it asks for on its
    stdout ("NEED <what>") on its stdin: a measurement (its id), a device
    connecting or disconnecting, or the current one-time code."""
    args = {"url": f"http://127.0.0.1:{p.http_port}/", "tenant": "demo-hospital",
            "other_tenant": OTHER, "manager": ["mgr", pw["mgr"]],
            "other_clinician": ["oclin", pw["oclin"]], "mfa_user": ["mfa-clin", pw["mfa"]],
            "device": "dash-1", "screenshots": str(screenshots) if screenshots else None}
    proc = subprocess.Popen(["node", str(NODE / "dashboard.mjs"), json.dumps(args)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=NODE)
    out, lines, held = None, [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            need = line.split()[1:] if line.startswith("NEED ") else None
            if need == ["measurement"]:
                answer = measure(p, "dash-1")
            elif need == ["connect"]:
                held = Device(p, "dash-1")
                held.connect()
                answer = "connected"
            elif need == ["disconnect"]:
                held.close()
                held = None
                answer = "disconnected"
            elif need == ["otp"]:
                answer = totp(pw["mfa_secret"])
            elif line.startswith("{"):
                out = json.loads(line)
                continue
            else:
                continue
            proc.stdin.write(f"{answer}\n")
            proc.stdin.flush()
        rc = proc.wait(240)
    finally:
        if held:
            held.close()
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert out, f"no report from the browser:\n{''.join(lines)[-2000:]}\n{err[-2000:]}"
    assert rc == 0 and "error" not in out, out.get("error") or err[-2000:]
    return out


def test_dashboard_in_chromium(dash):
    p, pw = dash
    shots = os.environ.get("FM_SCREENSHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
    out = browse(p, pw, shots)

    assert out["status"] == 200
    csp = out["csp"] or ""
    assert "script-src 'self'" in csp and "default-src 'none'" in csp, csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp, csp
    assert out["console_errors"] == [], out["console_errors"]
    assert out["failed_loads"] == [], out["failed_loads"]
    # The only API errors are the ones the scenario provokes: the wrong
    # password (and the missing second factor), the spoilt access token
    # (the fleet's list and stream, renewed), and the other hospital asking
    # for this device.
    errs = set(out["api_errors"])
    provoked = {"401 /api/v1/auth/login", "401 /api/v1/devices", "401 /api/v1/fleet/events"}
    assert {"401 /api/v1/auth/login", "401 /api/v1/fleet/events",
            "404 /api/v1/devices/dash-1"} <= errs, errs
    assert all(e in provoked or e.startswith("404 /api/v1/devices/dash-1") for e in errs), errs
    assert out["renewed"] is True

    assert "Wrong" in out["wrong_password_message"], out["wrong_password_message"]
    assert "dash-1" in out["fleet_devices"] and "other-dev" not in out["fleet_devices"]
    # Presence pushed to the open fleet page: online, then offline.
    assert out["presence_seen"] == ["offline", "online", "offline"], out["presence_seen"]
    # The certificate's end: `device add` issues one for the default term
    # (a date, not "unknown").
    assert any(c.isdigit() for c in out["fleet_cert"]), out["fleet_cert"]

    assert out["plot_pixels"] > 1000, "the sweep was not drawn"
    outputs = dict(out["outputs"])
    assert set(outputs) == {"viscosity_high_mpas", "viscosity_low_mpas", "hematocrit_pct"}
    assert "mPa·s" in outputs["viscosity_high_mpas"] and "plausible" in outputs["hematocrit_pct"]
    assert len(out["measurement_rows"]) == 2
    # Pushed live: the new measurement is on top and plotted, no reload.
    assert out["live_first_row"] == out["live_measurement"]
    print(f"live measurement shown {out['live_ms']} ms after it was asked for")

    # Markup in a firmware string is text on the page, and nothing ran.
    assert XSS in out["firmware_texts"], out["firmware_texts"]
    assert out["script_elements"] == ["/assets/uPlot.iife.min.js", "/assets/app.js"]

    # The label entered on the page is the measurement's label in the API.
    assert "41.5" in out["label_text"] and "lab" in out["label_text"], out["label_text"]
    mid = out["labelled_measurement"]
    api = Api(p)
    tok = api.login("mgr", pw["mgr"])["access_token"]
    detail = api.ok("GET", f"/devices/dash-1/measurements/{mid}", tok)
    # (The page corrected 41.5 to 42: the current label is the correction.)
    assert detail["label"]["outputs"] == {"hematocrit_pct": 42}, detail["label"]
    assert detail["label"]["source"] == "lab" and detail["label"]["labelled_by"] == "mgr"
    # Corrected on the page: the current label is the correction, the
    # earlier value is in the history (page and API).
    assert "Hematocrit 42 (lab" in out["corrected_label_text"], out["corrected_label_text"]
    assert any("41.5" in t for t in out["label_history"]), out["label_history"]
    hist = api.ok("GET", f"/devices/dash-1/measurements/{mid}/labels", tok)["items"]
    assert [x["outputs"]["hematocrit_pct"] for x in hist] == [41.5, 42], hist

    # Desired state changed on the page is the shadow's, with a delta.
    assert out["desired_bad_json"] == "That is not JSON."
    shadow = api.ok("GET", "/devices/dash-1/shadow", tok)
    assert shadow["desired"] == {"sample_interval_s": 30}, shadow
    assert shadow["delta"] == {"sample_interval_s": 30}, shadow
    assert '"sample_interval_s": 30' in out["shadow_text"]

    # Disabled through the page: stored, and the broker refuses the device.
    assert out["status_after_disable"] == "disabled"
    assert p.query("SELECT status FROM devices WHERE id = ?", "dash-1")[0][0] == 1

    def refused():
        d = Device(p, "dash-1")
        try:
            return d.try_connect(timeout=5) not in ("connected", "timeout")
        finally:
            d.close()
    wait_for(refused, 5, interval=0.1, msg="dash-1 refused after the disable")

    # The models page names the served model, its outputs and today's drift.
    assert "viscosity (serving 1.0.0)" in out["models_text"], out["models_text"]
    assert "hematocrit_pct [%] 15–70" in out["models_text"], out["models_text"]
    assert "Drift" in out["models_text"]

    # Another hospital's clinician: not in the fleet, and the page says not found.
    assert "dash-1" not in out["other_fleet_devices"] and "other-dev" in out["other_fleet_devices"]
    assert out["other_device_page"] == "Not found."
    assert out["tablet_overflow"] is False

    # A second factor: the page asks for the code, and the code lets her in.
    assert "one-time code" in out["mfa_prompt"], out["mfa_prompt"]
    assert out["mfa_signed_in"] == "mfa-clin · demo-hospital", out["mfa_signed_in"]


def test_assets_and_their_headers(dash):
    p, _ = dash
    import urllib.request
    for path, ctype in (("/", "text/html"), ("/assets/app.js", "text/javascript"),
                        ("/assets/uPlot.iife.min.js", "text/javascript"),
                        ("/assets/app.css", "text/css")):
        with urllib.request.urlopen(f"http://127.0.0.1:{p.http_port}{path}", timeout=5) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith(ctype), path
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
            assert r.headers["X-Frame-Options"] == "DENY"
            assert r.read()
    st, body = p.api_http("/assets/nope.js")
    assert st == 404 and json.loads(body)["error"]["code"] == "not_found"
    # The API's own responses keep the API's policy (nothing may run there).
    st, _ = p.api_http("/api/v1/me")
    assert st == 401


def test_event_stream_access(dash):
    """The live stream is the API's: a token is needed, and another
    hospital's user gets 404 for this device, as for its other pages."""
    p, pw = dash
    api = Api(p)
    r = api.get("/devices/dash-1/events")
    assert r.status == 401
    tok = api.login("oclin", pw["oclin"], tenant=OTHER)["access_token"]
    assert api.get("/devices/dash-1/events", token=tok).status == 404


def test_fleet_stream_is_the_tenants(dash):
    """GET /fleet/events: a device connecting and leaving is pushed to its
    tenant's users, never to another hospital's; the measurement's label
    history is readable through the API."""
    p, pw = dash
    api = Api(p)
    assert api.get("/fleet/events").status == 401
    mine = EventStream(api, "/fleet/events", api.login("oclin", pw["oclin"], tenant=OTHER)["access_token"])
    theirs = EventStream(api, "/fleet/events", api.login("mgr", pw["mgr"])["access_token"])
    try:
        assert mine.status == 200 and theirs.status == 200
        assert mine.next() == ("ready", {"tenant": OTHER})
        assert theirs.next() == ("ready", {"tenant": "demo-hospital"})
        dev = Device(p, "other-dev")
        dev.connect()
        ev, data = mine.next()
        assert ev == "presence" and data["device"] == "other-dev" and data["online"] is True, data
        assert data["tenant"] == OTHER and data["changed_at"], data
        dev.close()
        ev, data = mine.next()
        assert ev == "presence" and data["device"] == "other-dev" and data["online"] is False
        # The other hospital's stream saw nothing of it (only keepalives).
        with pytest.raises(AssertionError):
            theirs.next(timeout=1.5)
    finally:
        mine.close()
        theirs.close()
    # Label history of a measurement nobody labelled: empty, not an error;
    # of another hospital's device: not found.
    tok = api.login("mgr", pw["mgr"])["access_token"]
    assert api.ok("GET", "/devices/dash-1/measurements/nope/labels", tok) == {"items": []}
    otok = api.login("oclin", pw["oclin"], tenant=OTHER)["access_token"]
    assert api.get("/devices/dash-1/measurements/nope/labels", token=otok).status == 404
