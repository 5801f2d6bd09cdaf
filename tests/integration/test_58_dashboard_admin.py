"""The dashboard's administration pages and model actions (docs/operations.md,
"The dashboard"), in a real browser: playwright-core drives Debian's chromium
headless against `fleetml serve` (tests/node/admin.mjs does the clicking and
reports what it saw; this file prepares the platform and checks through the
API that what the page did is what happened).

- an admin creates a provisioning template on the page (listed there and in
  the API; a second one of the same name shows the API's refusal), and gets
  a claim certificate as a downloaded file holding the certificate and its
  key, which the page itself never shows;
- the admin creates a clinician with a password the page generates and
  shows once, gives her the data scientist role too, disables her (the API
  says disabled, her sign-in fails) and enables her again (she signs in with
  that password), and removes another user's second factor, each change
  confirmed first;
- the audit log lists those actions, a page at a time, and its filters
  (action, time, actor) narrow it;
- a data scientist approves one pending model version, rejects another and
  points the canary at the approved one for a share of the devices; a
  version the API refuses to deploy gives a message in the page;
- a clinician sees no administration links, no model controls, and the users
  page shows the API's refusal;
- no console error, no API error but those the scenario provokes, and no
  sideways scrolling at tablet width.
"""

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest

from api_client import Api, add_user, totp
from helpers import TENANT, cert_info, model_dir

ROOT = Path(__file__).resolve().parents[2]
NODE = ROOT / "tests" / "node"
CHROMIUM = Path("/usr/bin/chromium")
MODEL = "viscosity"
APPROVE, REJECT = "1.0.1-dash", "1.0.2-dash"
TEMPLATE = "ward-seven"
NEW_USER = "nurse-ines"
MFA_USER = "nurse-mfa"   # has a second factor, reset on the page
SHARE = 25


@pytest.fixture(scope="module")
def admin_dash(module_platform):
    if not CHROMIUM.exists() or not (NODE / "node_modules" / "playwright-core").exists():
        pytest.fail("chromium or playwright-core missing: run scripts/install-deps",
                    pytrace=False)
    pw = {}

    def setup(p):
        pw["sci"] = add_user(p, "sci", "data_scientist")
        pw["clin"] = add_user(p, "clin", "clinician")
        pw["mfa"] = add_user(p, MFA_USER, "clinician")

    p = module_platform("dashadm", devices=["adm-1"], setup=setup)
    pw["admin"] = p.admin_password
    api = Api(p)
    # A second factor for MFA_USER (her phone, lost later).
    tok = api.login(MFA_USER, pw["mfa"])["access_token"]
    r = api.post("/me/mfa/totp", {"current_password": pw["mfa"]}, token=tok)
    assert r.status == 201, r
    api.ok("POST", "/me/mfa/totp/confirm", tok, body={"otp": totp(r.json()["secret"])})
    # Two pending versions of the bundled model (as test_49 uploads them).
    sci = api.login("sci", pw["sci"])["access_token"]
    src = Path(model_dir())
    raw = base64.b64encode((src / "model.json").read_bytes()).decode()
    for version in (APPROVE, REJECT):
        man = json.loads((src / "manifest.json").read_text())
        man["version"] = version
        r = api.post(f"/models/{MODEL}/versions", {"manifest": man, "model": raw}, token=sci)
        assert r.status == 201 and r.json()["status"] == "pending", r
    # More than one page (50) of audit entries, so the page has more to show.
    admin = api.login("admin", pw["admin"])["access_token"]
    for _ in range(60):
        api.ok("GET", "/devices?limit=1", admin)
    return p, pw


def browse(p, pw, download_dir, screenshots=None):
    """Runs tests/node/admin.mjs; answers its question ("NEED disabled <user>
    <password>": the user was just disabled on the page) with what the API
    says then, kept in the returned report as "disabled_seen"."""
    args = {"url": f"http://127.0.0.1:{p.http_port}/", "tenant": TENANT,
            "admin": ["admin", pw["admin"]], "scientist": ["sci", pw["sci"]],
            "clinician": ["clin", pw["clin"]], "template": TEMPLATE, "new_user": NEW_USER, "mfa_user": MFA_USER,
            "model": MODEL, "approve_version": APPROVE, "reject_version": REJECT,
            "canary_share": SHARE, "download_dir": str(download_dir),
            "screenshots": str(screenshots) if screenshots else None}
    proc = subprocess.Popen(["node", str(NODE / "admin.mjs"), json.dumps(args)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=NODE)
    api = Api(p)
    out, lines, seen = None, [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            need = line.split()[1:] if line.startswith("NEED ") else None
            if need and need[0] == "disabled":
                user, password = need[1], need[2]
                admin = api.login("admin", pw["admin"])["access_token"]
                seen = {"status": api.ok("GET", f"/users/{user}", admin)["status"],
                        "login": api.login_resp(user, password).status}
                answer = "checked"
            elif line.startswith("{"):
                out = json.loads(line)
                continue
            else:
                continue
            proc.stdin.write(f"{answer}\n")
            proc.stdin.flush()
        rc = proc.wait(240)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert out, f"no report from the browser:\n{''.join(lines)[-2000:]}\n{err[-2000:]}"
    assert rc == 0 and "error" not in out, (out.get("error") or err[-2000:], out.get("steps"))
    out["disabled_seen"] = seen
    return out


def test_admin_pages_in_chromium(admin_dash, tmp_path):
    p, pw = admin_dash
    shots = os.environ.get("FM_SCREENSHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
    out = browse(p, pw, tmp_path, shots)
    api = Api(p)
    admin = api.login("admin", pw["admin"])["access_token"]

    assert out["console_errors"] == [], out["console_errors"]
    assert out["failed_loads"] == [], out["failed_loads"]
    # The only API errors are the ones the scenario provokes: the duplicate
    # template, the rejected version offered for production, and the
    # clinician on the users page.
    assert set(out["api_errors"]) == {
        "409 /api/v1/templates", f"409 /api/v1/models/{MODEL}/aliases/production",
        "403 /api/v1/users"}, out["api_errors"]

    # Who sees which links.
    assert out["admin_nav"] == {"nav-models": True, "nav-provisioning": True,
                                "nav-users": True, "nav-audit": True}, out["admin_nav"]
    assert out["clinician_nav"] == {"nav-models": True, "nav-provisioning": False,
                                    "nav-users": False, "nav-audit": False}, out["clinician_nav"]

    # The template made on the page, as the API has it.
    assert TEMPLATE in out["template_row"] and "ward-7" in out["template_row"], out["template_row"]
    tpl = {t["name"]: t for t in api.ok("GET", "/templates", admin)["items"]}
    assert TEMPLATE in tpl, tpl
    t = tpl[TEMPLATE]
    assert (t["group"], t["device_prefix"], t["cert_days"], t["has_allowlist"]) == \
        ("ward-7", "w7", 400, True), t
    assert "Not created" in out["template_conflict"] and "exists" in out["template_conflict"], \
        out["template_conflict"]

    # The claim certificate: a file with the certificate (CN claim:<template>)
    # and the private key that belongs to it; the page warned and never
    # showed the key.
    pem = Path(out["claim_path"]).read_text()
    assert "-----BEGIN CERTIFICATE-----" in pem and "-----BEGIN PRIVATE KEY-----" in pem, pem[:200]
    serial, cn = cert_info(pem)
    assert cn == f"claim:{TEMPLATE}", cn
    name = out["claim_filename"]
    assert name.startswith(f"claim-{TEMPLATE}-") and name.endswith(".pem"), name
    assert int(name[len(f"claim-{TEMPLATE}-"):-4], 16) == serial, (name, serial)
    key_pub = subprocess.run(["openssl", "pkey", "-pubout"], input=pem, capture_output=True,
                             text=True, timeout=30).stdout
    cert_pub = subprocess.run(["openssl", "x509", "-noout", "-pubkey"], input=pem,
                              capture_output=True, text=True, timeout=30).stdout
    assert key_pub and key_pub == cert_pub, "the key is not the certificate's"
    assert out["claim_href"].startswith("blob:"), out["claim_href"]
    assert out["key_in_page"] is False
    assert "only once" in out["claim_warning"], out["claim_warning"]

    # The user: created as a clinician with the password the page showed,
    # roles changed, disabled (API and sign-in agree), enabled again.
    secret = out["new_user_secret"]
    assert len(secret) >= 20 and secret in out["user_created_text"], out["user_created_text"]
    assert out["created_roles"] == ["clinician"] and out["created_status"] == "active"
    assert out["changed_roles"] == ["clinician", "data_scientist"], out["changed_roles"]
    assert out["secret_after_redraw"] is False, "the password stayed on the page"
    assert out["disabled_status"] == "disabled" and out["enabled_status"] == "active"
    assert out["disabled_seen"] == {"status": "disabled", "login": 401}, out["disabled_seen"]
    u = api.ok("GET", f"/users/{NEW_USER}", admin)
    assert sorted(u["roles"]) == ["clinician", "data_scientist"] and u["status"] == "active", u
    assert api.login_resp(NEW_USER, secret).status == 200
    # The second factor removed on the page: the API says so, and the
    # password alone signs her in.
    assert (out["mfa_before"], out["mfa_after"], out["mfa_reset_buttons"]) == ("on", "off", 0), out
    assert api.ok("GET", f"/users/{MFA_USER}", admin)["mfa"] is False
    assert api.login_resp(MFA_USER, pw["mfa"]).status == 200
    # Each change was confirmed first (creating is not asked).
    asked = out["dialogs"]
    for q in (f"Change the roles of {NEW_USER} to clinician, data_scientist", f"Disable {NEW_USER}",
              f"Enable {NEW_USER}", f"Remove the second factor of {MFA_USER}", f"Approve {MODEL} version {APPROVE}",
              f"Reject {MODEL} version {REJECT}",
              f"Point canary of {MODEL} at version {APPROVE} for {SHARE} %"):
        assert any(d.startswith(q) for d in asked), (q, asked)
    assert not any("Create" in d for d in asked), asked

    # The audit log: 50 at first, more on demand; filtered by action, time
    # and actor.
    assert out["audit_first"] == 50 and out["audit_more_shown"] is True, out["audit_first"]
    assert out["audit_after_more"] > 50, out["audit_after_more"]
    assert {"user.create", "user.roles", "user.disable", "user.enable", "template.create",
            "template.claim_cert"} <= set(out["audit_actions"]), out["audit_actions"]
    created = out["audit_user_create"]
    assert created and all(r["action"] == "user.create" for r in created), created
    assert len(created) < out["audit_after_more"]
    target = f"user:{TENANT}/{NEW_USER}"
    mine = [r for r in created if r["cells"][3] == target]
    assert len(mine) == 1, created
    time_, actor, action, _, outcome, _, details = mine[0]["cells"]
    assert (actor, action, outcome) == (f"user:{TENANT}/admin", "user.create", "ok"), mine
    assert json.loads(details) == {"roles": "clinician"}, details
    assert out["audit_future"] == [], out["audit_future"]
    by_admin = out["audit_actor"]
    assert by_admin and all(r["cells"][1] == f"user:{TENANT}/admin" for r in by_admin), by_admin
    # The page's rows are the API's entries.
    api_created = api.ok("GET", "/audit?action=user.create&limit=500", admin)["items"]
    assert len(api_created) == len(created), (api_created, created)

    # The model versions decided on the page, and the canary pointed.
    assert set(out["pending_before"]) >= {APPROVE, REJECT}, out["pending_before"]
    assert out["version_statuses"][APPROVE] == "approved"
    assert out["version_statuses"][REJECT] == "rejected"
    versions = {v["version"]: v for v in
                api.ok("GET", f"/models/{MODEL}/versions", admin)["items"]}
    assert versions[APPROVE]["status"] == "approved" and versions[REJECT]["status"] == "rejected"
    assert versions[APPROVE]["decision"]["by"].endswith("/sci"), versions[APPROVE]
    # Only approved versions are offered (and removing the alias).
    assert APPROVE in out["alias_versions"] and REJECT not in out["alias_versions"]
    assert "" in out["alias_versions"]
    assert out["share_hidden_for_production"] is True and out["share_hidden_for_canary"] is False
    assert APPROVE in out["canary_text"] and f"({SHARE} %)" in out["canary_text"], out["canary_text"]
    aliases = {a["alias"]: a for a in api.ok("GET", f"/models/{MODEL}/aliases", admin)["items"]}
    assert aliases["canary"]["version"] == APPROVE and aliases["canary"]["share_pct"] == SHARE, aliases
    assert aliases["canary"]["updated_by"].endswith("/sci"), aliases
    # The refused deployment left production as it was, and said why.
    assert "production" not in aliases, aliases
    assert "Not changed" in out["alias_refused"] and "approved" in out["alias_refused"], \
        out["alias_refused"]

    # The clinician: no controls, and the API's refusal on the users page.
    assert out["clinician_decision_buttons"] == 0 and out["clinician_alias_forms"] == 0
    assert out["clinician_users_page"] == "You are not allowed to see this."

    assert out["tablet_overflow"] == {"nav-provisioning": False, "nav-users": False,
                                      "nav-audit": False}, out["tablet_overflow"]
