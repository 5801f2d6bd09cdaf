"""Drift of live features against the served version's training baseline
(docs/model.md, "Drift"): the simulator's own patient mix stays below the
threshold; the same devices with hematocrit shifted by 15 points cross it,
which raises one alert (audit entry, metric) and shows in the API."""

import subprocess

import pytest

from api_client import Api, Users, add_user
from helpers import TENANT, metric_value, wait_for

NAME = "viscosity"


@pytest.fixture(scope="module")
def env(module_platform):
    pw = {}

    def setup(p):
        pw["sci"] = add_user(p, "sci", "data_scientist")

    p = module_platform("drift", sets={"model.drift_min_count": "100"}, setup=setup)
    users = Users(Api(p))
    users.add("sci", pw["sci"])
    return p, Api(p), users.token("sci")


def sim(p, shift, duration=6):
    r = subprocess.run([p.bin, "sim", "--data", str(p.data), "--devices", "6", "--prefix", "dr",
                        "--rate", "10", "--duration", str(duration), "--provision", "--drain", "10",
                        "--hct-shift", str(shift), "--seed", "11"],
                       capture_output=True, text=True, timeout=120, cwd=p.workdir, env=p.env)
    assert r.returncode == 0, r.stderr[-2000:]


def drift(api, token):
    doc = api.ok("GET", f"/models/{NAME}/drift", token)
    items = [i for i in doc["items"] if i["model"] == f"{NAME}@1.0.0"]
    return doc, (items[0] if items else None)


def test_drift_low_without_shift_high_with_it(env):
    p, api, tok = env
    sim(p, 0)
    sent = p.query("SELECT COUNT(*) FROM measurements WHERE device_id LIKE 'dr%'")[0][0]
    assert sent >= 200, sent
    # The node adds its counts to the store every 10 s.
    wait_for(lambda: (drift(api, tok)[1] or {}).get("measurements") == sent, 30, interval=0.5,
             msg="the day's counts in the drift report")
    doc, quiet = drift(api, tok)
    assert doc["threshold"] == 0.25 and doc["min_measurements"] == 100
    assert quiet["psi_max"] < 0.25 and quiet["alert"] is False, quiet
    assert len(quiet["psi"]) == 14
    assert (metric_value(p.metrics(), "fleetml_drift_alerts_total") or 0) == 0

    sim(p, 15, duration=10)
    total = p.query("SELECT COUNT(*) FROM measurements WHERE device_id LIKE 'dr%'")[0][0]
    wait_for(lambda: (drift(api, tok)[1] or {}).get("measurements") == total, 30, interval=0.5,
             msg="the shifted counts in the drift report")
    _, shifted = drift(api, tok)
    assert shifted["psi_max"] > 0.25 and shifted["alert"] is True, shifted
    assert shifted["psi_max"] > 3 * quiet["psi_max"], (quiet["psi_max"], shifted["psi_max"])
    # One alert: a log line, an audit entry, the metric.
    wait_for(lambda: metric_value(p.metrics(), "fleetml_drift_alerts_total") == 1, 30,
             interval=0.5, msg="the drift alert")
    rows = p.query("SELECT tenant, target, details FROM audit WHERE action = 'drift.alert'")
    assert len(rows) == 1 and rows[0][1] == f"{NAME}@1.0.0", rows
    assert "drift alert" in "".join(open(f).read() for f in p.log_paths)
    assert metric_value(p.metrics(), "fleetml_drift_psi_max") > 0.25
    # Per tenant and version too, with the value the API reports.
    def per_series():
        v = metric_value(p.metrics(), "fleetml_drift_psi", tenant=TENANT, model=f"{NAME}@1.0.0")
        return v if v is not None and abs(v - shifted["psi_max"]) < 0.05 * shifted["psi_max"] \
            else None
    wait_for(per_series, 30, interval=0.5, msg="fleetml_drift_psi of the tenant and version")
