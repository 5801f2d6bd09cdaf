"""`fleetml init` and `fleetml device add` (issue acceptance item 10)."""

import re
import sqlite3
import stat
import subprocess

from helpers import Platform, file_digests


def parse_ini(text):
    out, section = {}, ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif "=" in line:
            k, v = line.split("=", 1)
            v = re.split(r"\s[#;]", v, maxsplit=1)[0]
            out[f"{section}.{k.strip()}"] = v.strip().strip('"')
    return out


def test_init_layout_idempotent_and_private_keys(fm_bin, tmp_path):
    p = Platform(fm_bin, tmp_path)
    r = p.init()
    assert p.admin_password, f"no 'admin password: <pw>' line in:\n{r.stdout}"
    assert len(p.admin_password) >= 12, "admin password is short"
    d = p.data
    for rel in ("fleetml.conf", "pki/ca.crt", "pki/ca.key", "pki/broker.crt", "pki/broker.key",
                "pki/service.crt", "pki/service.key", "db/fleetml.db"):
        assert (d / rel).is_file(), f"{rel} missing after init"
    assert (d / "lake").is_dir()
    for key in ("pki/ca.key", "pki/broker.key", "pki/service.key"):
        mode = stat.S_IMODE((d / key).stat().st_mode)
        assert mode == 0o600, f"{key} has mode {oct(mode)}"

    # The --set values are persisted for later commands.
    conf = parse_ini((d / "fleetml.conf").read_text())
    for key, value in p.sets().items():
        assert conf.get(key) == value, f"{key}={value} not persisted (file has {conf.get(key)!r})"

    # The password is not stored in clear anywhere in the data directory.
    for f in d.rglob("*"):
        if f.is_file():
            assert p.admin_password.encode() not in f.read_bytes(), f"password in clear in {f}"

    con = sqlite3.connect(f"file:{p.db_path}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    finally:
        con.close()

    before = file_digests(d)
    r2 = p.run("init", "--data", str(d))
    assert "admin password:" not in r2.stdout, "second init printed (a new?) admin password"
    after = file_digests(d)
    assert after == before, "init twice changed the data directory: " + str(
        {k for k in set(before) | set(after) if before.get(k) != after.get(k)})


def test_device_add(fm_bin, tmp_path):
    p = Platform(fm_bin, tmp_path)
    p.init()
    p.add_device("dev-one")
    dd = p.device_dir("dev-one")
    assert (dd / "device.crt").is_file() and (dd / "device.key").is_file()
    mode = stat.S_IMODE((dd / "device.key").stat().st_mode)
    assert mode == 0o600, f"device.key has mode {oct(mode)}"

    r = subprocess.run(
        ["openssl", "x509", "-in", str(dd / "device.crt"), "-noout", "-subject"],
        capture_output=True, text=True, check=True)
    assert re.search(r"CN\s*=\s*dev-one\b", r.stdout), r.stdout
    v = subprocess.run(
        ["openssl", "verify", "-CAfile", p.ca_cert, str(dd / "device.crt")],
        capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr

    key_before = (dd / "device.key").read_bytes()
    again = p.add_device("dev-one", check=False)
    assert again.returncode != 0, "adding the same device twice succeeded"
    assert (dd / "device.key").read_bytes() == key_before, "second add replaced the key"

    bad = p.add_device("Bad_ID!", check=False)
    assert bad.returncode != 0, "an invalid device id was accepted"
