"""The deployment files in deploy/ (docs/operations.md, "Deployment files"),
checked with the tools that read them. These checks are syntax and
structure only: nothing here starts Kubernetes or touches AWS.

- HAProxy: `haproxy -c` accepts the configuration (with a test certificate
  in place of the real one); devices are passed through in TCP mode, the
  API is HTTP, both health-check /readyz on the operations port;
- systemd: `systemd-analyze verify` accepts the unit without a warning;
- Kubernetes: every document parses and has the fields the API server
  requires; the node's configuration in the ConfigMap is one fleetml
  accepts; probes point at the operations port;
- Terraform: HashiCorp's HCL parser (@cdktf/hcl2json) reads every file;
  the lake bucket is versioned, encrypted and private, and the nodes' IAM
  policy touches nothing but the lake prefix.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NODE = ROOT / "tests" / "node"


def test_haproxy_config(tmp_path):
    cfg = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=test", "-days", "1",
                    "-keyout", tmp_path / "k.pem", "-out", tmp_path / "c.pem"],
                   check=True, capture_output=True)
    pem = tmp_path / "api.pem"
    pem.write_bytes((tmp_path / "c.pem").read_bytes() + (tmp_path / "k.pem").read_bytes())
    assert "/etc/haproxy/fleetml-api.pem" in cfg
    (tmp_path / "h.cfg").write_text(cfg.replace("/etc/haproxy/fleetml-api.pem", str(pem)))
    r = subprocess.run(["haproxy", "-c", "-f", tmp_path / "h.cfg"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "Configuration file is valid" in r.stdout, r.stdout + r.stderr
    assert "[WARNING]" not in r.stdout + r.stderr, r.stdout + r.stderr
    sections = re.split(r"\n(?=(?:frontend|backend) )", cfg)
    mqtt = next(s for s in sections if s.startswith("backend fleetml_mqtt"))
    api = next(s for s in sections if s.startswith("backend fleetml_api"))
    assert "mode tcp" in mqtt and "mode http" in api
    for s in (mqtt, api):
        assert "uri /readyz" in s and "check port 9180" in s, s


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
def test_systemd_unit(tmp_path, fm_bin):
    unit = (DEPLOY / "systemd" / "fleetml.service").read_text()
    # verify checks that ExecStart exists: point it at the binary under test.
    (tmp_path / "fleetml.service").write_text(unit.replace("/usr/local/bin/fleetml", fm_bin))
    r = subprocess.run(["systemd-analyze", "verify", tmp_path / "fleetml.service"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "fleetml.service" not in r.stderr, r.stderr  # no warning about the unit
    for opt in ("ProtectSystem=strict", "NoNewPrivileges=yes", "CapabilityBoundingSet=",
                "SystemCallFilter=@system-service", "User=fleetml"):
        assert opt in unit, opt


def test_kubernetes_manifests(tmp_path, fm_bin):
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "fleetml.yaml").read_text()))
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), d
    kinds = [d["kind"] for d in docs]
    assert {"StatefulSet", "Service", "ConfigMap", "Secret"} <= set(kinds), kinds
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= \
        sts["spec"]["template"]["metadata"]["labels"].items()
    c = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"mqtts": 8883, "http": 8080, "ops": 9180}, ports
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # Every Service selects the StatefulSet's pods and names ports that exist.
    for svc in (d for d in docs if d["kind"] == "Service"):
        assert svc["spec"]["selector"] == {"app": "fleetml"}
        for p in svc["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            assert tp in ports or tp in ports.values(), (svc["metadata"]["name"], tp)
    # The node configuration is one fleetml accepts (as the init container
    # writes it: the ConfigMap's file plus the node id).
    conf = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["fleetml.conf"]
    data = tmp_path / "data"
    data.mkdir()
    (data / "fleetml.conf").write_text(conf + "[node]\nid = fleetml-0\n")
    # The whole file is parsed and checked before --set applies; the lake
    # check then runs on a local directory (no cluster here).
    r = subprocess.run([fm_bin, "lake", "check", "--data", str(data), "--set", "lake.backend=fs"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "lake fs ok" in r.stdout, r.stdout + r.stderr
    bad = data / "fleetml.conf"
    bad.write_text(conf.replace("[ops]", "[ops]\nport = 70000"))
    r = subprocess.run([fm_bin, "lake", "check", "--data", str(data), "--set", "lake.backend=fs"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "ops.port" in r.stderr, r.stderr  # the check can fail


def test_terraform_module():
    tf = sorted((DEPLOY / "terraform" / "aws").glob("*.tf"))
    assert {p.name for p in tf} >= {"main.tf", "variables.tf", "outputs.tf"}
    r = subprocess.run(["node", NODE / "hcl2json.js", *tf], capture_output=True, text=True,
                       timeout=120, cwd=NODE)
    assert r.returncode == 0, r.stderr
    parsed = json.loads(r.stdout)
    main = parsed[str(DEPLOY / "terraform" / "aws" / "main.tf")]
    res = main["resource"]
    for kind in ("aws_db_instance", "aws_s3_bucket", "aws_lb", "aws_autoscaling_group",
                 "aws_iam_role", "aws_s3_bucket_versioning",
                 "aws_s3_bucket_server_side_encryption_configuration",
                 "aws_s3_bucket_public_access_block"):
        assert kind in res, kind
    assert res["aws_s3_bucket_versioning"]["lake"][0]["versioning_configuration"][0][
        "status"] == "Enabled"
    pab = res["aws_s3_bucket_public_access_block"]["lake"][0]
    assert all(pab[k] is True for k in ("block_public_acls", "block_public_policy",
                                        "ignore_public_acls", "restrict_public_buckets"))
    db = res["aws_db_instance"]["main"][0]
    assert db["storage_encrypted"] is True and db["engine"] == "postgres"
    # Least privilege: object actions only under the lake prefix, no wildcard action.
    pol = main["data"]["aws_iam_policy_document"]["lake"][0]["statement"]
    for st in pol:
        assert all(not a.endswith("*") for a in st["actions"]), st
        for r_ in st["resources"]:
            assert r_.endswith("/fleetml/*") or r_.endswith("/fleetml/_check/*") or \
                r_ == "${aws_s3_bucket.lake.arn}", r_
    # The NLB health checks are the nodes' /readyz on the operations port.
    for tg in res["aws_lb_target_group"].values():
        hc = tg[0]["health_check"][0]
        assert hc["path"] == "/readyz" and hc["port"] == "9180"
