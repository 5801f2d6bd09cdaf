"""The model registry and deployment (docs/model.md, "Registry and
deployment"): upload validated, pending -> approved by a data scientist or
admin, per-tenant production alias moved while devices measure (their
results name the version that produced them), rollback, a canary share
split by a stable hash of the device id, and bad uploads refused with
nothing deployed."""

import base64
import json
import shutil
import time
import subprocess
from pathlib import Path

import pytest

from api_client import Api, Users, add_user, raw_exchange
from helpers import TENANT, make_measurement, model_dir, unique_id, wait_for

NAME = "viscosity"
DEVICES = ["mr-dev-1", "mr-dev-2", "mr-dev-3", "mr-dev-4", "mr-dev-5", "mr-dev-6"]


def bucket(device_id):
    """fm_serving_bucket: FNV-1a of the id, modulo 100."""
    h = 2166136261
    for b in device_id.encode():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h % 100


@pytest.fixture(scope="module")
def env(module_platform, tmp_path_factory):
    pw = {}

    def setup(p):
        pw["sci"] = add_user(p, "sci", "data_scientist")
        pw["clin"] = add_user(p, "clin", "clinician")

    p = module_platform("models", devices=DEVICES, setup=setup)
    users = Users(Api(p))
    users.add("admin", p.admin_password)
    for n, v in pw.items():
        users.add(n, v)
    work = tmp_path_factory.mktemp("models")
    # The bundled model, registered as it is, and a second one trained on
    # other simulated patients (other trees, other answers).
    v1 = work / "v1"
    shutil.copytree(model_dir(), v1)
    v2 = work / "v2"
    p.run("model", "train", "--synthetic", "--out", str(v2), "--seed", "7", "--rows", "1500",
          timeout=300)
    man = json.loads((v2 / "manifest.json").read_text())
    man["version"] = "2.0.0"
    (v2 / "manifest.json").write_text(json.dumps(man))
    return p, Api(p), users, v1, v2


def tok(env, user):
    return env[2].token(user)


def upload_body(d, manifest=None, model=None):
    man = manifest if manifest is not None else json.loads((d / "manifest.json").read_text())
    raw = model if model is not None else (d / "model.json").read_bytes()
    return {"manifest": man, "model": base64.b64encode(raw).decode()}


@pytest.fixture
def measure(env, connected):
    """measure(device_id) -> (model of the ok reply, outputs); the stored row
    names the same model. One connection per device for the test."""
    p = env[0]
    conns = {}
    sweep = make_measurement("template")

    def run(device_id):
        d = conns.get(device_id) or conns.setdefault(device_id, connected(p, device_id))
        mid = unique_id("mr")
        reply, _ = d.measure(dict(sweep, id=mid), timeout=10)
        doc = reply.json()
        assert doc["status"] == "ok", doc
        stored = p.query("SELECT model FROM measurements WHERE device_id = ? AND "
                         "measurement_id = ?", device_id, mid)
        assert stored == [(doc["model"],)], (stored, doc)
        return doc["model"], doc["outputs"]
    return run


def test_push_approve_deploy_rollback(env, measure):
    p, api, users, v1, v2 = env
    sci, clin, admin = tok(env, "sci"), tok(env, "clin"), tok(env, "admin")
    # Who may do what.
    assert api.post(f"/models/{NAME}/versions", upload_body(v2), token=clin).status == 403
    r = api.post(f"/models/{NAME}/versions", upload_body(v2), token=sci)
    assert r.status == 201, r
    v = r.json()
    assert v["version"] == "2.0.0" and v["status"] == "pending" and len(v["sha256"]) == 64
    assert api.post(f"/models/{NAME}/versions", upload_body(v2), token=sci).status == 409
    # The files are in the lake, byte for byte.
    lake = p.data / "lake" / "models" / NAME / "2.0.0"
    assert p.lake_read(lake / "model.json") == (v2 / "model.json").read_bytes()
    # Pending versions are not deployed.
    r = api.request("PUT", f"/models/{NAME}/aliases/production", body={"version": "2.0.0"},
                    token=admin)
    assert r.status == 409, r
    assert api.post(f"/models/{NAME}/versions/2.0.0/approve", {}, token=clin).status == 403
    r = api.post(f"/models/{NAME}/versions/2.0.0/approve", {"note": "holdout ok"}, token=sci)
    assert r.status == 200 and r.json()["status"] == "approved", r
    assert r.json()["decision"]["note"] == "holdout ok"
    assert api.post(f"/models/{NAME}/versions/2.0.0/reject", {}, token=sci).status == 409

    before, out_before = measure(DEVICES[0])
    assert before == f"{NAME}@1.0.0"
    r = api.request("PUT", f"/models/{NAME}/aliases/production", body={"version": "2.0.0"},
                    token=admin)
    assert r.status == 200, r
    # Every node's deployer notices within a tick; results then name 2.0.0.
    wait_for(lambda: measure(DEVICES[0])[0] == f"{NAME}@2.0.0", 20,
             interval=0.2, msg="results from version 2.0.0")
    _, out_after = measure(DEVICES[0])
    assert out_after != out_before, "the new version answered exactly like the old one"
    got = api.ok("GET", f"/models/{NAME}/aliases", admin)["items"]
    assert [(a["alias"], a["version"]) for a in got] == [("production", "2.0.0")], got

    # Rollback: register the bundled model too and move the alias back.
    assert api.post(f"/models/{NAME}/versions", upload_body(v1), token=sci).status == 201
    assert api.post(f"/models/{NAME}/versions/1.0.0/approve", {}, token=admin).status == 200
    r = api.request("PUT", f"/models/{NAME}/aliases/production", body={"version": "1.0.0"},
                    token=sci)
    assert r.status == 200, r
    wait_for(lambda: measure(DEVICES[0])[0] == f"{NAME}@1.0.0", 20,
             interval=0.2, msg="results from version 1.0.0 again")
    _, out_back = measure(DEVICES[0])
    assert out_back == out_before
    audit = api.ok("GET", "/audit?limit=200", admin)["items"]
    actions = {a["action"] for a in audit}
    assert {"model.upload", "model.approve", "model.deploy"} <= actions, actions


def test_canary_splits_devices_by_stable_hash(env, measure):
    p, api, users, v1, v2 = env
    admin = tok(env, "admin")
    # (Depends on the versions the test above registered and approved.)
    r = api.request("PUT", f"/models/{NAME}/aliases/production", body={"version": "1.0.0"},
                    token=admin)
    assert r.status == 200, r
    r = api.request("PUT", f"/models/{NAME}/aliases/canary",
                    body={"version": "2.0.0", "share_pct": 50}, token=admin)
    assert r.status == 200 and r.json()["share_pct"] == 50, r
    expect = {d: f"{NAME}@2.0.0" if bucket(d) < 50 else f"{NAME}@1.0.0" for d in DEVICES}
    assert len(set(expect.values())) == 2, f"pick device ids on both sides: {expect}"

    def split_applied():
        return all(measure(d)[0] == want for d, want in expect.items())
    wait_for(split_applied, 20, interval=0.2, msg="the canary split")
    # Stable: the same devices again, the same versions.
    for d, want in expect.items():
        assert measure(d)[0] == want
    # Removing the canary sends everyone to production.
    r = api.request("PUT", f"/models/{NAME}/aliases/canary", body={"version": None},
                    token=admin)
    assert r.status == 200, r
    wait_for(lambda: all(measure(d)[0] == f"{NAME}@1.0.0" for d in DEVICES),
             20, interval=0.2, msg="canary removed")


def test_shadow_scored_and_stored_never_sent(env, measure):
    p, api, users, v1, v2 = env
    admin, clin = tok(env, "admin"), tok(env, "clin")
    for alias, ver in (("production", "1.0.0"), ("shadow", "2.0.0")):
        r = api.request("PUT", f"/models/{NAME}/aliases/{alias}", body={"version": ver},
                        token=admin)
        assert r.status == 200, r
    dev = DEVICES[1]

    def shadowed():
        model, _ = measure(dev)
        rows = p.query("SELECT measurement_id, shadow FROM measurements WHERE device_id = ? "
                       "ORDER BY seq DESC LIMIT 1", dev)
        return model == f"{NAME}@1.0.0" and rows[0][1] is not None and rows[0]
    mid, shadow = wait_for(shadowed, 20, interval=0.2, msg="a shadow answer stored")
    doc = json.loads(shadow)
    assert doc["model"] == f"{NAME}@2.0.0" and doc["id"] == mid and doc["status"] == "ok", doc
    # The API shows it beside the live result; the device never saw it.
    got = api.ok("GET", f"/devices/{dev}/measurements/{mid}", clin)
    assert got["result"]["model"] == f"{NAME}@1.0.0"
    assert got["shadow"]["model"] == f"{NAME}@2.0.0"
    assert got["shadow"]["outputs"] != got["result"]["outputs"]
    # ...and the lake keeps it with the row, for checking the candidate later.
    def exported():
        recs = [x for _, x in p.lake_records("raw") if x.get("measurement_id") == mid]
        return recs and recs[0]
    rec = wait_for(exported, 20, interval=0.2, msg="the row in the lake")
    assert rec["shadow"]["model"] == f"{NAME}@2.0.0" and rec["result"]["model"] == f"{NAME}@1.0.0"
    r = api.request("PUT", f"/models/{NAME}/aliases/shadow", body={"version": None}, token=admin)
    assert r.status == 200, r


def overflowing_model(v1):
    """The bundled trees with every leaf at 3e38: their sum is not a finite
    float32 for any input."""
    doc = json.loads((v1 / "model.json").read_text())
    for tree in doc["learner"]["gradient_booster"]["model"]["trees"]:
        for i, left in enumerate(tree["left_children"]):
            if left == -1:
                tree["split_conditions"][i] = 3.0e38
                tree["base_weights"][i] = 3.0e38
    return json.dumps(doc).encode()


def test_bad_uploads_refused_nothing_deployed(env):
    p, api, users, v1, v2 = env
    sci, admin = tok(env, "sci"), tok(env, "admin")
    man = json.loads((v1 / "manifest.json").read_text())
    cases = {}
    bad = dict(man, version="9.0.1")
    cases["corrupt model file"] = upload_body(v1, manifest=bad, model=b"{\"not\": \"a model\"}")
    unknown = dict(man, version="9.0.2", features=man["features"][:-1] + ["bogus_feature"])
    cases["unknown feature"] = upload_body(v1, manifest=unknown)
    fewer = dict(man, version="9.0.3", outputs=man["outputs"][:2])
    cases["outputs disagree"] = upload_body(v1, manifest=fewer)
    cases["non-finite outputs"] = upload_body(v1, manifest=dict(man, version="9.0.4"),
                                              model=overflowing_model(v1))
    cases["name differs"] = upload_body(v1, manifest=dict(man, name="other", version="9.0.5"))
    for what, body in cases.items():
        r = api.post(f"/models/{NAME}/versions", body, token=sci)
        assert r.status == 422, (what, r)
        assert r.json()["error"]["code"] == "validation_failed", (what, r)
    r = api.post(f"/models/{NAME}/versions", {"manifest": man, "model": "not base64!"}, token=sci)
    assert r.status == 400, r
    # Oversize: refused from its declared length, before the body is read.
    head = (f"POST /api/v1/models/{NAME}/versions HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {sci}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {64 * 1024 * 1024}\r\n\r\n").encode()
    status, _, body, _ = raw_exchange(p.http_port, head, b"{", timeout=10)
    assert status == 413, (status, body[:200])
    versions = {v["version"] for v in api.ok("GET", f"/models/{NAME}/versions", sci)["items"]}
    assert not any(v.startswith("9.0.") for v in versions), versions
    for ver in ("9.0.1", "9.0.4"):
        assert api.request("PUT", f"/models/{NAME}/aliases/production", body={"version": ver},
                           token=admin).status == 404
    assert not p.lake_exists(f"models/{NAME}/9.0.1")


def test_cli_push_approve_deploy(env):
    p, api, users, v1, v2 = env
    v3 = Path(str(v2) + "-cli")
    shutil.copytree(v2, v3)
    man = json.loads((v3 / "manifest.json").read_text())
    man["version"] = "2.0.1"
    (v3 / "manifest.json").write_text(json.dumps(man))
    out = p.cli("model", "push", str(v3)).stdout
    assert "viscosity@2.0.1 pending" in out, out
    r = p.cli("model", "deploy", NAME, "2.0.1", "--tenant", TENANT, check=False)
    assert r.returncode == 1 and "not approved" in r.stderr, r.stderr
    p.cli("model", "approve", NAME, "2.0.1", "--note", "cli")
    p.cli("model", "deploy", NAME, "2.0.1", "--tenant", TENANT)
    listing = p.cli("model", "versions", NAME).stdout
    assert "2.0.1" in listing and "production -> 2.0.1" in listing, listing
    admin = tok(env, "admin")
    v = api.ok("GET", f"/models/{NAME}/versions/2.0.1", admin)
    assert v["status"] == "approved" and v["manifest"]["version"] == "2.0.1"
    assert v.get("owner_tenant") is None  # the platform's
    r = subprocess.run([p.bin, "model", "deploy", "--data", str(p.data)], capture_output=True,
                       text=True, cwd=p.workdir)
    assert r.returncode == 2, r.stderr


def test_ubj_model_file_accepted_and_scores_as_json(env):
    """The same trees saved by Python XGBoost as UBJ: accepted as format
    `ubj`, and it predicts what the JSON file predicts."""
    import xgboost as xgb
    p, api, users, v1, v2 = env
    js = Path(str(v2) + "-json")
    shutil.copytree(v2, js)
    man = json.loads((js / "manifest.json").read_text())
    man["version"] = "2.0.2-json"
    (js / "manifest.json").write_text(json.dumps(man))
    p.cli("model", "push", str(js))
    p.cli("model", "approve", NAME, "2.0.2-json")
    ubj = Path(str(v2) + "-ubj")
    shutil.copytree(v2, ubj)
    booster = xgb.Booster(model_file=str(ubj / "model.json"))
    booster.save_model(str(ubj / "model.ubj"))
    (ubj / "model.json").unlink()
    man = json.loads((ubj / "manifest.json").read_text())
    man["version"] = "2.0.2-ubj"
    (ubj / "manifest.json").write_text(json.dumps(man))
    out = p.cli("model", "push", str(ubj)).stdout
    assert "viscosity@2.0.2-ubj pending" in out, out
    admin = tok(env, "admin")
    v = api.ok("GET", f"/models/{NAME}/versions/2.0.2-ubj", admin)
    assert v["format"] == "ubj", v
    p.cli("model", "approve", NAME, "2.0.2-ubj")
    clin = tok(env, "clin")
    n = len(man["features"])
    body = {"instances": [[0.5 + 0.37 * i + 0.11 * row for i in range(n)] for row in range(4)]}
    preds = {}
    for ver in ("2.0.2-json", "2.0.2-ubj"):
        r = api.post(f"/models/{NAME}/invocations?version={ver}", body, token=clin)
        assert r.status == 200, (ver, r)
        preds[ver] = r.json()["predictions"]
    assert len(preds["2.0.2-ubj"]) == 4
    for a, b in zip(preds["2.0.2-json"], preds["2.0.2-ubj"]):
        assert all(abs(x - y) < 1e-6 for x, y in zip(a, b)), preds


def test_hot_swap_under_load_fails_no_reply(env):
    # Devices measure continuously while the production alias moves back and
    # forth: no reply fails or times out, and both versions answered.
    p, api, users, v1, v2 = env
    admin = tok(env, "admin")
    for ver in ("1.0.0", "2.0.0"):
        r = api.get(f"/models/{NAME}/versions/{ver}", token=admin)
        assert r.status == 200 and r.json()["status"] == "approved", r
    sim = subprocess.Popen(
        [p.bin, "sim", "--data", str(p.data), "--devices", "6", "--prefix", "hs", "--rate", "15",
         "--duration", "8", "--json", "--provision", "--drain", "10", "--timeout", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=p.workdir, env=p.env)
    moves = 0
    try:
        deadline = time.monotonic() + 8
        ver = "2.0.0"
        while time.monotonic() < deadline and sim.poll() is None:
            r = api.request("PUT", f"/models/{NAME}/aliases/production", body={"version": ver},
                            token=admin)
            assert r.status == 200, r
            moves += 1
            ver = "1.0.0" if ver == "2.0.0" else "2.0.0"
            time.sleep(0.7)
        out, err = sim.communicate(timeout=60)
    finally:
        if sim.poll() is None:
            sim.kill()
    stats = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    assert moves >= 6, moves
    assert stats["sent"] >= 300 and stats["ok"] == stats["sent"], stats
    assert stats["errors"] == 0 and stats["timeouts"] == 0, stats
    models = {m for (m,) in p.query("SELECT DISTINCT model FROM measurements "
                                    "WHERE device_id LIKE 'hs%'")}
    # (Before the first move took effect, what an earlier test deployed.)
    assert {f"{NAME}@1.0.0", f"{NAME}@2.0.0"} <= models, models


def features_of(p, doc):
    """`fleetml features` on one measurement: {feature: value}."""
    r = subprocess.run([p.bin, "features"], input=json.dumps(doc) + "\n", capture_output=True,
                       text=True, timeout=60, cwd=p.workdir)
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.strip().splitlines()[:2]
    names, values = header.split(",")[1:], row.split(",")[1:]
    return {n: float(v) for n, v in zip(names, values)}


def test_mlflow_scoring_protocol(env):
    p, api, users, v1, v2 = env
    clin, admin = tok(env, "clin"), tok(env, "admin")
    r = api.request("PUT", f"/models/{NAME}/aliases/production", body={"version": "1.0.0"},
                    token=admin)
    assert r.status == 200, r
    docs = [make_measurement(unique_id("ml")) for _ in range(3)]
    feats = [features_of(p, d) for d in docs]
    names = list(feats[0])
    expected = []
    for d in docs:
        r = api.request("POST", f"/models/{NAME}/predict", raw=json.dumps(d).encode(), token=clin)
        assert r.status == 200, r
        expected.append([r.json()["outputs"][k] for k in
                         ("viscosity_high_mpas", "viscosity_low_mpas", "hematocrit_pct")])
    shuffled = list(reversed(names))
    bodies = {
        "dataframe_split": {"dataframe_split": {"columns": shuffled,
                                                "data": [[f[n] for n in shuffled] for f in feats]}},
        "dataframe_records": {"dataframe_records": feats},
        "instances": {"instances": [[f[n] for n in names] for f in feats]},
        "inputs as columns": {"inputs": {n: [f[n] for f in feats] for n in names}},
    }
    for what, body in bodies.items():
        r = api.post(f"/models/{NAME}/invocations", body, token=clin)
        assert r.status == 200, (what, r)
        pred = r.json()["predictions"]
        assert len(pred) == 3 and all(len(row) == 3 for row in pred), (what, pred)
        for got, want in zip(pred, expected):
            # predict rounds to 3 decimals; the features CSV carries 9 digits.
            assert all(abs(g - w) < 2e-3 for g, w in zip(got, want)), (what, got, want)
    # Another version on request; MLflow's error shape for bad input.
    r = api.post(f"/models/{NAME}/invocations?version=2.0.0", bodies["instances"], token=clin)
    assert r.status == 200 and r.json()["predictions"] != expected, r
    bad = {"dataframe_records": [dict(feats[0], bogus=1.0)]}
    r = api.post(f"/models/{NAME}/invocations", bad, token=clin)
    assert r.status == 400 and r.json()["error_code"] == "BAD_REQUEST", r
    r = api.post(f"/models/{NAME}/invocations", {"instances": [[1.0, 2.0]]}, token=clin)
    assert r.status == 400, r
    r = api.post(f"/models/{NAME}/invocations", {"instances": [], "inputs": []}, token=clin)
    assert r.status == 400, r
    assert api.post("/models/nosuch/invocations", bodies["instances"], token=clin).status == 404


# --------------------------------------------------------------------------
# Python interoperability: a model trained with Debian's python3-xgboost on
# `fleetml features` output scores in fleetml exactly as in Python, pushed
# as a plain directory (API) or as an MLflow model directory (CLI).

MLMODEL = """artifact_path: model
flavors:
  python_function:
    data: {data}
    env:
      conda: conda.yaml
      virtualenv: python_env.yaml
    loader_module: mlflow.xgboost
    python_version: 3.11.2
  xgboost:
    code: null
    data: {data}
    model_class: xgboost.core.Booster
    model_format: xgb
    xgb_version: 1.7.4
mlflow_version: 2.9.2
model_uuid: 6f1c2a9e0b5d4c3e8a7f1e2d3c4b5a69
run_id: 3d2f8a1c9b7e4f6a8c0d1e2f3a4b5c6d
signature:
  inputs: '{inputs}'
  outputs: '[{{"type": "tensor", "tensor-spec": {{"dtype": "float32", "shape": [-1, 3]}}}}]'
utc_time_created: '2026-12-01 09:30:00.000000'
"""


def python_model(p, work, n=300):
    import numpy as np
    import xgboost as xgb
    docs = [make_measurement(f"py-{i}", temperature_c=35.0 + (i % 5)) for i in range(n)]
    r = subprocess.run([p.bin, "features"], input="".join(json.dumps(d) + "\n" for d in docs),
                       capture_output=True, text=True, timeout=120, cwd=p.workdir)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    names = lines[0].split(",")[1:]
    x = np.array([[float(v) for v in ln.split(",")[1:]] for ln in lines[1:]], dtype=np.float32)
    # Labels the trees can learn from the features (the values do not
    # matter here: only that fleetml and Python agree on the answers).
    y = np.stack([2.0 + x[:, 1], 3.0 - x[:, 2], 40.0 + 10.0 * x[:, 8]], axis=1)
    booster = xgb.train({"tree_method": "hist", "max_depth": 4, "eta": 0.3, "nthread": 1},
                        xgb.DMatrix(x, label=y, feature_names=names), num_boost_round=20)
    manifest = {
        "name": NAME, "version": "py-1", "kind": "viscosity.sweep.v1", "features": names,
        "outputs": [{"name": "viscosity_high_mpas", "unit": "mPa*s", "min": 1.5, "max": 12.0},
                    {"name": "viscosity_low_mpas", "unit": "mPa*s", "min": 2.5, "max": 80.0},
                    {"name": "hematocrit_pct", "unit": "%", "min": 15.0, "max": 70.0}],
        "training": {"source": "python3-xgboost", "rows": n},
    }
    want = booster.predict(xgb.DMatrix(x, feature_names=names))
    return booster, manifest, names, x, want


def test_python_and_mlflow_models_score_as_in_python(env):
    p, api, users, v1, v2 = env
    sci, clin = tok(env, "sci"), tok(env, "clin")
    work = p.workdir / "py"
    work.mkdir()
    booster, manifest, names, x, want = python_model(p, work)
    # A plain directory through the API (JSON model file).
    booster.save_model(str(work / "model.json"))
    (work / "manifest.json").write_text(json.dumps(manifest))
    r = api.post(f"/models/{NAME}/versions", upload_body(work), token=sci)
    assert r.status == 201, r
    assert api.post(f"/models/{NAME}/versions/py-1/approve", {}, token=sci).status == 200
    # An MLflow model directory through the CLI (legacy binary `model.xgb`).
    ml = p.workdir / "mlflow-model"
    ml.mkdir()
    booster.save_model(str(ml / "model.xgb"))
    cols = json.dumps([{"name": n, "type": "float"} for n in names])
    (ml / "MLmodel").write_text(MLMODEL.format(data="model.xgb", inputs=cols))
    (ml / "manifest.json").write_text(json.dumps(dict(manifest, version="py-mlflow-1")))
    out = p.cli("model", "push", str(ml)).stdout
    assert "viscosity@py-mlflow-1 pending" in out, out
    p.cli("model", "approve", NAME, "py-mlflow-1")
    got = api.ok("GET", f"/models/{NAME}/versions/py-mlflow-1", sci)
    assert got["manifest"]["training"]["mlflow"]["run_id"] == "3d2f8a1c9b7e4f6a8c0d1e2f3a4b5c6d"
    body = {"dataframe_split": {"columns": names, "data": x.tolist()}}
    for version in ("py-1", "py-mlflow-1"):
        r = api.post(f"/models/{NAME}/invocations?version={version}", body, token=clin)
        assert r.status == 200, r
        pred = r.json()["predictions"]
        worst = max(abs(g - float(w)) for row_g, row_w in zip(pred, want)
                    for g, w in zip(row_g, row_w))
        assert worst <= 1e-6, f"{version}: largest difference from Python {worst}"
    # A signature whose columns are not the features is refused.
    bad = p.workdir / "mlflow-bad"
    shutil.copytree(ml, bad)
    cols_bad = json.dumps([{"name": n, "type": "float"} for n in reversed(names)])
    (bad / "MLmodel").write_text(MLMODEL.format(data="model.xgb", inputs=cols_bad))
    (bad / "manifest.json").write_text(json.dumps(dict(manifest, version="py-mlflow-2")))
    r = p.cli("model", "push", str(bad), check=False)
    assert r.returncode == 1 and "signature column 0" in r.stderr, r.stderr


def test_lineage_of_a_prediction(env, measure):
    p, api, users, v1, v2 = env
    admin, clin = tok(env, "admin"), tok(env, "clin")
    for alias, ver in (("production", "2.0.0"), ("shadow", "1.0.0")):
        r = api.request("PUT", f"/models/{NAME}/aliases/{alias}", body={"version": ver},
                        token=admin)
        assert r.status == 200, r
    dev = DEVICES[2]
    wait_for(lambda: measure(dev)[0] == f"{NAME}@2.0.0", 20, interval=0.2,
             msg="results from 2.0.0")

    def with_shadow():
        measure(dev)
        rows = p.query("SELECT measurement_id, shadow FROM measurements WHERE device_id = ? "
                       "ORDER BY seq DESC LIMIT 1", dev)
        return rows[0][1] is not None and rows[0][0]
    mid = wait_for(with_shadow, 20, interval=0.2, msg="a measurement with a shadow answer")
    r = api.request("PUT", f"/devices/{dev}/measurements/{mid}/label",
                    body={"outputs": {"hematocrit_pct": 43.5}, "source": "lab:centrifuge"},
                    token=clin)
    assert r.status in (200, 201), r
    lin = api.ok("GET", f"/devices/{dev}/measurements/{mid}/lineage", clin)
    assert lin["measurement"]["id"] == mid and lin["device"]["id"] == dev
    assert lin["device"]["tenant"] == TENANT
    assert lin["result"]["model"] == f"{NAME}@2.0.0"
    assert lin["shadow"]["model"] == f"{NAME}@1.0.0"
    assert lin["label"]["outputs"] == {"hematocrit_pct": 43.5}
    mv = lin["model_version"]
    assert mv["registered"] and mv["version"] == "2.0.0" and mv["status"] == "approved", mv
    assert mv["decision"]["by"] and mv["training"]["seed"] == 7, mv
    ex = lin["explanation"]
    assert ex["model"] == f"{NAME}@2.0.0" and len(ex["features"]) == 14
    for out, value in lin["result"]["outputs"].items():
        contrib = ex["contributions"][out]
        total = sum(contrib.values())
        assert "bias" in contrib and abs(total - value) < 2e-3, (out, total, value)
    # Another tenant's clinician, or a role without measurements.read, sees nothing.
    assert api.get(f"/devices/{dev}/measurements/{mid}/lineage", token=admin).status == 403
    for alias in ("shadow",):
        api.request("PUT", f"/models/{NAME}/aliases/{alias}", body={"version": None}, token=admin)
