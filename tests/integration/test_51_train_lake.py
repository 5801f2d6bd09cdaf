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
    assert "100%" in r.stderr  # the progress bar reached the end
    v = api.ok("GET", f"/models/{NAME}/versions/lake-1", sci)
    assert v["status"] == "pending"
    man = v["manifest"]
    ds = man["training"]["dataset"]
    assert ds["source"] == "lake" and ds["measurements"] == len(rows) and len(ds["sha256"]) == 64
    val = man["validation"]
    assert val["production"]["model"] == f"{NAME}@1.0.0"
    for k in OUTS:
        assert val["metrics"][k]["mae"] < val["constant_mae"][k], (k, val)
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
