"""The lake on S3 (docs/operations.md, "The lake on S3"): the same export,
model storage and training as the directory lake, against s3rver behind a
gate that checks every request's SigV4 signature and checksums as AWS
does (tests/integration/s3gate.py). Objects are read back with boto3.

- every committed measurement lands in exactly one raw object, with the
  same layout as the directory lake, under the configured prefix;
- while the store answers 503, devices are still answered (the database
  is the durable copy), no object appears, the backlog grows; when it is
  back the backlog drains and nothing is lost or doubled;
- uploads above lake.s3_part_bytes go up in parts; bucket in the path or
  in the host name;
- a registered model's files and training from the lake work on S3;
- a wrong secret is refused by the gate (the signatures are checked).
"""

import gzip
import json
import re
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from api_client import Api, Users, add_user
from helpers import (LAKE_OBJECT_RE, TENANT, Device, make_measurement, metric_value, unique_id,
                     wait_for)
from s3gate import KEY_ID, SECRET, S3Gate

PREFIX = "fleetml/"
OUTS = ("viscosity_high_mpas", "viscosity_low_mpas", "hematocrit_pct")


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    g = S3Gate(tmp_path_factory.mktemp("s3")).start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def env(gate, module_platform):
    pw = {}

    def setup(p):
        pw["clin"] = add_user(p, "clin", "clinician")
        pw["sci"] = add_user(p, "sci", "data_scientist")

    sets = {"pipeline.device_rate": "0", **gate.lake_sets("path", PREFIX)}
    p = module_platform("s3lake", sets=sets, setup=setup)
    users = Users(Api(p))
    for n, v in pw.items():
        users.add(n, v)
    return p, Api(p), users


def raw_rows(gate):
    """{(device, measurement id): count} over every raw object, and the keys."""
    seen, keys = {}, gate.keys(PREFIX + "raw/")
    for k in keys:
        for line in gzip.decompress(gate.get(k)).decode().splitlines():
            if line.strip():
                r = json.loads(line)
                key = (r["device_id"], r["measurement_id"])
                seen[key] = seen.get(key, 0) + 1
    return seen, keys


def sim(p, prefix, n, seconds, provision=True):
    args = [p.bin, "sim", "--data", str(p.data), "--devices", str(n), "--prefix", prefix,
            "--rate", "5", "--duration", str(seconds), "--drain", "10", "--seed", "3"]
    if provision:
        args.append("--provision")
    r = subprocess.run(args, capture_output=True, text=True, timeout=180, cwd=p.workdir,
                       env=p.env)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def committed(p, prefix):
    return {(d, m) for d, m in p.query(
        "SELECT device_id, measurement_id FROM measurements WHERE device_id LIKE ?", prefix + "%")}


def test_export_to_s3_outage_and_drain(env, gate):
    p, api, users = env
    sim(p, "s3a", 5, 4)
    rows = committed(p, "s3a")
    assert len(rows) >= 50, len(rows)
    wait_for(lambda: rows <= set(raw_rows(gate)[0]), 60, interval=0.5,
             msg="every committed measurement in S3")
    seen, keys = raw_rows(gate)
    assert all(seen[k] == 1 for k in rows), "a measurement in two objects"
    for k in keys:
        parts = k[len(PREFIX):].split("/")
        assert parts[0] == "raw" and parts[1] == f"tenant={TENANT}", k
        assert re.fullmatch(r"date=\d{4}-\d{2}-\d{2}", parts[2]) and \
            re.fullmatch(r"hour=\d{2}", parts[3]), k
        assert LAKE_OBJECT_RE.match(parts[4]) and parts[4].startswith(p.node_id + "-"), k
    users.token("clin")  # a sign-in: audited, so exported under logs/
    wait_for(lambda: gate.keys(PREFIX + "logs/"), 30, interval=0.5,
             msg="the audit log in S3")

    # The store goes away: devices are still answered, nothing new appears.
    before = set(gate.keys(PREFIX))
    gate.down = True
    try:
        sim(p, "s3b", 3, 3, provision=True)
        during = committed(p, "s3b")
        assert len(during) >= 25, len(during)
        wait_for(lambda: metric_value(p.metrics(), "fleetml_lake_errors_total") > 0, 60,
                 interval=0.5, msg="the exporter notices the outage")
        assert metric_value(p.metrics(), "fleetml_lake_backlog") > 0
    finally:
        gate.down = False
    assert set(gate.keys(PREFIX)) >= before
    # Back: the backlog drains, nothing lost, nothing doubled.
    wait_for(lambda: (rows | during) <= set(raw_rows(gate)[0]), 90, interval=0.5,
             msg="the backlog in S3 after the outage")
    seen, _ = raw_rows(gate)
    assert all(seen[k] == 1 for k in rows | during)
    wait_for(lambda: metric_value(p.metrics(), "fleetml_lake_backlog") == 0, 30,
             interval=0.5, msg="backlog 0")
    assert not gate.refused, gate.refused[:3]


def test_model_files_and_training_from_s3(env, gate):
    p, api, users = env
    sci, clin = users.token("sci"), users.token("clin")
    sim(p, "s3t", 10, 5)
    rows = p.query("SELECT device_id, measurement_id, result FROM measurements "
                   "WHERE device_id LIKE 's3t%'")
    assert len(rows) >= 150, len(rows)
    for dev, mid, result in rows:
        outs = json.loads(result)["outputs"]
        body = {"outputs": {k: round(1.1 * outs[k] + 0.5, 3) for k in OUTS}, "source": "lab"}
        r = api.request("PUT", f"/devices/{dev}/measurements/{mid}/label", body=body, token=clin)
        assert r.status in (200, 201), r
    want = {(d, m) for d, m, _ in rows}
    wait_for(lambda: want <= set(raw_rows(gate)[0]) and len(gate.keys(PREFIX + "labels/")) > 0,
             60, interval=0.5, msg="measurements and labels in S3")

    def labels_in_s3():
        n = 0
        for k in gate.keys(PREFIX + "labels/"):
            n += sum(1 for ln in gzip.decompress(gate.get(k)).decode().splitlines() if ln)
        return n >= len(rows)
    wait_for(labels_in_s3, 60, interval=0.5, msg="every label in S3")
    r = api.request("POST", "/training-jobs", body={"version": "s3-1"}, token=sci)
    assert r.status == 202, r
    jid = r.json()["id"]

    def done():
        j = api.ok("GET", f"/training-jobs/{jid}", sci)
        return j if j["status"] in ("done", "failed") else None
    j = wait_for(done, 600, interval=0.5, msg="training job on the S3 lake")
    assert j["status"] == "done", j
    v = api.ok("GET", "/models/viscosity/versions/s3-1", sci)
    man = v["manifest"]
    assert man["training"]["dataset"]["measurements"] == len(rows)
    for k in OUTS:
        assert man["validation"]["metrics"][k]["mae"] < man["validation"]["constant_mae"][k]
    # The version's files are in the bucket, byte for byte what the API serves.
    keys = gate.keys(PREFIX + "models/viscosity/s3-1/")
    assert len(keys) >= 2, keys
    assert any(json.loads(gate.get(k)).get("version") == "s3-1"
               for k in keys if k.endswith("manifest.json")), keys
    assert not gate.refused, gate.refused[:3]


@pytest.mark.parametrize("addressing", ["path", "virtual"])
def test_lake_check_multipart_and_addressing(env, gate, addressing, tmp_path):
    p = env[0]
    data = tmp_path / "check"
    sets = {**gate.lake_sets(addressing, "chk/"), "lake.s3_part_bytes": str(5 << 20)}
    args = ["init", "--data", str(data)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    p.run(*args)
    mark = len(gate.requests)
    size = (12 << 20) + 5
    r = p.run("lake", "check", "--bytes", str(size), "--data", str(data), timeout=120)
    assert f"lake s3 ok: _check/" in r.stdout and f"{size} bytes" in r.stdout, r.stdout
    # The check's own requests: the running platform (prefix fleetml/) may
    # export an object through the same gate meanwhile.
    reqs = [r for r in gate.requests[mark:] if "/fleetml/" not in r[1]]
    parts = [q for m, _, q, st in reqs if m == "PUT" and q.startswith("partNumber=")]
    assert len(parts) == 3, reqs  # 5 + 5 + 2 MiB
    assert any(m == "POST" and q == "uploads=" for m, _, q, _ in reqs)
    assert any(m == "POST" and q.startswith("uploadId=") for m, _, q, _ in reqs)
    paths = {path for _, path, _, _ in reqs}
    if addressing == "path":
        assert all(x.startswith(f"/{gate.bucket}") for x in paths), paths
    else:
        assert not any(x.startswith(f"/{gate.bucket}/") for x in paths), paths
    assert not gate.keys("chk/_check/"), "the check object was deleted"
    assert not gate.refused, gate.refused[:3]


def test_wrong_secret_is_refused(env, gate, tmp_path):
    p = env[0]
    data = tmp_path / "wrong"
    sets = {**gate.lake_sets("path"), "lake.s3_secret_access_key": "not-the-secret"}
    args = ["init", "--data", str(data)]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    p.run(*args)
    r = p.run("lake", "check", "--data", str(data), check=False)
    assert r.returncode == 1 and "SignatureDoesNotMatch" in r.stderr, r.stderr
    assert gate.refused and "SignatureDoesNotMatch" in gate.refused[-1][2]
    gate.refused.clear()


class RoleCredentials:
    """A stand-in for EC2's instance metadata service (IMDSv2) and for a
    container credentials endpoint, on loopback: temporary credentials of
    the gate's key, each with its own session token, expiring `ttl` from
    issue."""

    def __init__(self, ttl):
        self.ttl = ttl
        self.issued = []        # session tokens handed out
        self.issued_at = []     # time.time() of each
        self.auth_seen = []     # Authorization headers on the container endpoint
        creds = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status, body, ctype="text/plain"):
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _creds(self):
                tok = f"session-{len(creds.issued) + 1}"
                creds.issued.append(tok)
                creds.issued_at.append(time.time())
                exp = datetime.now(timezone.utc) + creds.ttl
                return json.dumps({"Code": "Success", "AccessKeyId": KEY_ID,
                                   "SecretAccessKey": SECRET, "Token": tok,
                                   "Expiration": exp.strftime("%Y-%m-%dT%H:%M:%SZ")})

            def do_PUT(self):
                if self.path == "/latest/api/token" and \
                        self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._send(200, "imds-session")
                return self._send(400, "bad token request")

            def do_GET(self):
                if self.path == "/container-creds":
                    creds.auth_seen.append(self.headers.get("Authorization"))
                    return self._send(200, self._creds(), "application/json")
                # IMDSv2: every read needs the session token.
                if self.headers.get("X-aws-ec2-metadata-token") != "imds-session":
                    return self._send(401, "")
                if self.path == "/latest/meta-data/iam/security-credentials/":
                    return self._send(200, "fleetml-node")
                if self.path == "/latest/meta-data/iam/security-credentials/fleetml-node":
                    return self._send(200, self._creds(), "application/json")
                return self._send(404, "")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def measurement_ids(gate, prefix):
    out = set()
    for k in gate.keys(prefix + "raw/"):
        for line in gzip.decompress(gate.get(k)).decode().splitlines():
            if line.strip():
                out.add(json.loads(line)["measurement_id"])
    return out


def role_sets(gate, prefix):
    sets = {k: v for k, v in gate.lake_sets("path", prefix).items()
            if k not in ("lake.s3_access_key_id", "lake.s3_secret_access_key")}
    sets["lake.s3_credentials"] = "role"
    return sets


def test_role_credentials_imds_and_container(env, gate, tmp_path):
    """lake.s3_credentials = role: temporary credentials from IMDSv2 (the
    session token first) or from a container endpoint (with its
    authorization token), signed with their session token."""
    p = env[0]
    creds = RoleCredentials(timedelta(hours=6))
    try:
        data = tmp_path / "role"
        args = ["init", "--data", str(data)]
        for k, v in role_sets(gate, "role/").items():
            args += ["--set", f"{k}={v}"]
        p.run(*args)
        p.env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = creds.url
        r = p.run("lake", "check", "--data", str(data))
        assert "lake s3 ok" in r.stdout, r.stdout + r.stderr
        assert creds.issued == ["session-1"] and "session-1" in gate.tokens
        p.env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = creds.url + "/container-creds"
        p.env["AWS_CONTAINER_AUTHORIZATION_TOKEN"] = "pod-identity-token"
        r = p.run("lake", "check", "--data", str(data))
        assert "lake s3 ok" in r.stdout, r.stdout + r.stderr
        assert creds.auth_seen == ["pod-identity-token"] and "session-2" in gate.tokens
        # No role: the command says so instead of falling back to nothing.
        creds.close()
        r = p.run("lake", "check", "--data", str(data), check=False)
        assert r.returncode == 1 and "credentials" in r.stderr, r.stderr
        assert not gate.refused, gate.refused[:3]
    finally:
        for k in ("AWS_EC2_METADATA_SERVICE_ENDPOINT", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                  "AWS_CONTAINER_AUTHORIZATION_TOKEN"):
            p.env.pop(k, None)


def test_role_credentials_renewed_before_expiry(gate, make_platform):
    """Credentials that expire in 5 min 3 s are renewed (5 min before they
    expire) by the running exporter, which keeps exporting with the new ones."""
    creds = RoleCredentials(timedelta(minutes=5, seconds=3))
    try:
        p = make_platform(devices=["role-dev"], start=False, name="role")
        p.env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = creds.url
        p.start(extra_args=[x for k, v in role_sets(gate, "renew/").items()
                            for x in ("--set", f"{k}={v}")])
        dev = Device(p, "role-dev")
        try:
            dev.connect()
            dev.subscribe(dev.results_topic)
            first = unique_id()
            assert dev.measure(make_measurement(first), timeout=10)[0].json()["status"] == "ok"
            wait_for(lambda: first in measurement_ids(gate, "renew/"), 60, interval=0.3,
                     msg="the first measurement in S3")
            # Wait until the credentials are within 5 minutes of expiring.
            wait_for(lambda: time.time() > creds.issued_at[0] + 3.5, 10, interval=0.1)
            second = unique_id()
            assert dev.measure(make_measurement(second), timeout=10)[0].json()["status"] == "ok"
            wait_for(lambda: second in measurement_ids(gate, "renew/"), 60, interval=0.3,
                     msg="the second measurement in S3")
        finally:
            dev.close()
        assert len(creds.issued) >= 2, creds.issued
        assert "session-2" in gate.tokens
        assert "s3 role credentials renewed" in "".join(
            open(f).read() for f in p.log_paths)
    finally:
        creds.close()
