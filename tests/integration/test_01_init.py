"""`fleetml init` and `fleetml device add` (issue acceptance item 10)."""

import re
import shutil
import sqlite3

import pytest
import stat
import subprocess
from pathlib import Path

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


def db_dump(db, scratch):
    """SQL dump of a copy of the database (opening the original would
    create -wal/-shm files next to it)."""
    scratch.mkdir()
    for suffix in ("", "-wal"):
        src = Path(str(db) + suffix)
        if src.exists():
            shutil.copyfile(src, scratch / ("x.db" + suffix))
    con = sqlite3.connect(scratch / "x.db")
    try:
        return list(con.iterdump())
    finally:
        con.close()


@pytest.mark.sqlite_only
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

    # WAL mode, read from the header so that no connection of ours creates
    # -wal/-shm files before the comparison below.
    header = p.db_path.read_bytes()[:100]
    assert header[:16] == b"SQLite format 3\0"
    assert header[18] == 2 and header[19] == 2, "database is not in WAL mode"

    before = file_digests(d)
    db_before = db_dump(p.db_path, tmp_path / "dump-before")
    db_bytes_before = p.db_path.read_bytes()
    r2 = p.run("init", "--data", str(d))
    assert "admin password:" not in r2.stdout, "second init printed (a new?) admin password"
    after = file_digests(d)
    assert db_dump(p.db_path, tmp_path / "dump-after") == db_before, \
        "init twice changed database contents"
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    detail = ""
    if "db/fleetml.db" in changed:
        a, b = db_bytes_before, p.db_path.read_bytes()
        offs = [i for i in range(min(len(a), len(b))) if a[i] != b[i]]
        detail = (f"; db/fleetml.db: sizes {len(a)} -> {len(b)}, differing byte offsets "
                  f"{offs[:10]} (24..27 = file change counter, 92..95 = version-valid-for: "
                  f"the second init ran a write transaction)")
    assert not changed, f"init twice changed files {sorted(changed)}{detail}"


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
