"""Training from the lake (docs/model.md, "Training from the lake"):
simulator measurements plus labels entered through the API give a pending
version whose validation MAE beats a constant predictor and is reported
next to production's; its manifest names the dataset, and the lineage of a
prediction it makes reaches that dataset. No labels: a clear error and
nothing registered."""

import json
import subprocess

import pytest

from api_client import Api, Users, add_user
from helpers import TENANT, wait_for

NAME = "viscosity"
OUTS = ("viscosity_high_mpas", "viscosity_low_mpas", "hematocrit_pct")


@pytest.fixture(scope="module")
def env(module_platform):
    pw = {}

    def setup(p):
        pw["clin"] = add_user(p, "clin", "clinician")
        pw["sci"] = add_user(p, "sci", "data_scientist")

    p = module_platform("trainlake", sets={"pipeline.device_rate": "0"}, setup=setup)
    users = Users(Api(p))
    for n, v in pw.items():
        users.add(n, v)
    users.add("admin", p.admin_password)
    return p, Api(p), users


def lake_count(p, area):
    return len(p.lake_records(area))


def test_train_from_lake_beats_constant_and_names_its_dataset(env):
    p, api, users = env
    clin, sci, admin = users.token("clin"), users.token("sci"), users.token("admin")
    # No labels yet: refused, nothing registered.
    r = p.cli("model", "train", "--from-lake", "--version", "lake-0", check=False)
    assert r.returncode == 1 and "not enough labelled measurements" in r.stderr, r.stderr
    r = subprocess.run([p.bin, "sim", "--data", str(p.data), "--devices", "10", "--prefix", "tl",
                        "--rate", "5", "--duration", "6", "--provision", "--drain", "10",
                        "--seed", "5"],
                       capture_output=True, text=True, timeout=120, cwd=p.workdir, env=p.env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = p.query("SELECT device_id, measurement_id, result FROM measurements "
                   "WHERE device_id LIKE 'tl%'")
    assert len(rows) >= 200, len(rows)
    # The lab's reference values: a known function of what the model said,
    # so a trained model can learn it and a constant cannot.
    for dev, mid, result in rows:
        outs = json.loads(result)["outputs"]
        body = {"outputs": {k: round(1.1 * outs[k] + 0.5, 3) for k in OUTS}, "source": "lab"}
        r = api.request("PUT", f"/devices/{dev}/measurements/{mid}/label", body=body, token=clin)
        assert r.status in (200, 201), r
    wait_for(lambda: lake_count(p, "labels") >= len(rows) and lake_count(p, "raw") >= len(rows),
             30, interval=0.5, msg="labels and measurements in the lake")
    r = p.cli("model", "train", "--from-lake", "--version", "lake-1", "--tenant", TENANT,
              timeout=600)
    assert "viscosity@lake-1 pending" in r.stdout, r.stdout + r.stderr
    # Not a terminal: no progress line (test_60 checks it on one).
    assert "100%" not in r.stderr and "[#" not in r.stderr, r.stderr
    v = api.ok("GET", f"/models/{NAME}/versions/lake-1", sci)
    assert v["status"] == "pending"
    man = v["manifest"]
    ds = man["training"]["dataset"]
    assert ds["source"] == "lake" and ds["measurements"] == len(rows) and len(ds["sha256"]) == 64
    val = man["validation"]
    assert val["production"]["model"] == f"{NAME}@1.0.0"
    for k in OUTS:
        assert val["metrics"][k]["mae"] < val["constant_mae"][k], (k, val)
    # Per tenant too: here one tenant, so its figures are the overall ones.
    assert list(val["per_tenant"]) == [TENANT], val["per_tenant"]
    pt = val["per_tenant"][TENANT]
    assert pt["rows"] == val["rows"]
    for k in OUTS:
        assert abs(pt["metrics"][k]["mae"] - val["metrics"][k]["mae"]) < 1e-6
        assert abs(pt["production"][k]["mae"] - val["production"]["metrics"][k]["mae"]) < 1e-6
    assert f"tenant {TENANT} (" in r.stdout, r.stdout
    assert "feature_baseline" in man
    # Approved and deployed, its predictions' lineage reaches the dataset.
    assert api.post(f"/models/{NAME}/versions/lake-1/approve", {}, token=sci).status == 200
    r = api.request("PUT", f"/models/{NAME}/aliases/production", body={"version": "lake-1"},
                    token=admin)
    assert r.status == 200, r

    def scored():
        subprocess.run([p.bin, "sim", "--data", str(p.data), "--devices", "1", "--prefix", "tl",
                        "--rate", "5", "--duration", "1", "--drain", "5"],
                       capture_output=True, text=True, timeout=60, cwd=p.workdir, env=p.env)
        got = p.query("SELECT device_id, measurement_id FROM measurements WHERE model = ? "
                      "LIMIT 1", f"{NAME}@lake-1")
        return got and got[0]
    dev, mid = wait_for(scored, 30, interval=0.5, msg="a result from lake-1")
    lin = api.ok("GET", f"/devices/{dev}/measurements/{mid}/lineage", clin)
    assert lin["model_version"]["training"]["dataset"]["sha256"] == ds["sha256"]


def test_training_job_through_the_api(env):
    """The same training as a background job: 202 with a job id, progress
    while it runs, the pending version when it is done; a job that cannot
    train fails with the reason and registers nothing."""
    p, api, users = env
    sci, clin = users.token("sci"), users.token("clin")
    # Clinicians may read models but not train them.
    r = api.request("POST", "/training-jobs", body={"version": "job-1"}, token=clin)
    assert r.status == 403, r
    r = api.request("POST", "/training-jobs", body={"version": "../x"}, token=sci)
    assert r.status == 400 and r.json()["error"]["code"] == "invalid_request", r
    if lake_count(p, "labels") < 200:
        pytest.skip("needs the labels of the previous test")
    r = api.request("POST", "/training-jobs", body={"version": "job-1"}, token=sci)
    assert r.status == 202, r
    job = r.json()
    assert job["status"] == "queued" and job["version"] == "job-1" and job["tenant"] == TENANT

    def finished(jid):
        j = api.ok("GET", f"/training-jobs/{jid}", sci)
        assert j["status"] in ("queued", "running", "done", "failed"), j
        return j if j["status"] in ("done", "failed") else None
    done = wait_for(lambda: finished(job["id"]), 600, interval=0.5, msg="training job done")
    assert done["status"] == "done" and done["percent"] == 100, done
    assert done["model"] == f"{NAME}@job-1" and done["rows"] >= 200, done
    v = api.ok("GET", f"/models/{NAME}/versions/job-1", sci)
    assert v["status"] == "pending" and v["manifest"]["training"]["dataset"]["source"] == "lake"
    assert v["manifest"]["training"]["job"] == job["id"]
    # A window with no labelled measurements: the job fails, nothing is registered.
    r = api.request("POST", "/training-jobs", body={"version": "job-2",
                    "from": "2001-01-01T00:00:00Z", "to": "2001-01-02T00:00:00Z"}, token=sci)
    assert r.status == 202, r
    failed = wait_for(lambda: finished(r.json()["id"]), 120, interval=0.5, msg="job-2 finished")
    assert failed["status"] == "failed" and "not enough labelled" in failed["error"], failed
    assert api.request("GET", f"/models/{NAME}/versions/job-2", token=sci).status == 404
    assert api.request("GET", "/training-jobs/999999", token=sci).status == 404
