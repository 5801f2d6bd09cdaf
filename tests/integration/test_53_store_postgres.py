"""The PostgreSQL store (docs/operations.md, "PostgreSQL"): the store's own
test suite run against a real server, then the platform on it end to end.

- the unit tests of the store's concerns (tests/unit/test_store.c and the
  other suites that open a store) pass unchanged on PostgreSQL: the same
  tests, parametrised by FM_TEST_STORE_URL, not copies;
- `fleetml serve` on store.backend = postgres: devices provisioned by claim
  are answered, every acknowledged measurement is a row, the lake export
  works from it;
- the server restarted under load: acknowledgements pause (devices are told
  `unavailable` and retry), nothing acknowledged is lost, nothing doubled.
"""

import os
import subprocess
from pathlib import Path

import pytest

from helpers import device_run_results, start_device_runs, wait_for
from pgserver import PgServer

UNIT_SUITES = ["test_store", "test_registry", "test_auth", "test_lake", "test_pipeline", "test_rules"]


@pytest.fixture(scope="module")
def pg():
    s = PgServer().start()
    yield s
    s.stop()


def build_dir():
    b = os.environ.get("FM_BUILD")
    if not b:
        pytest.skip("FM_BUILD (the CMake test build) is not set")
    return Path(b)


@pytest.mark.parametrize("suite", UNIT_SUITES)
def test_store_unit_suites_on_postgres(pg, suite):
    exe = build_dir() / suite
    assert exe.exists(), exe
    env = dict(os.environ, FM_TEST_STORE_URL=pg.url, ASAN_OPTIONS="detect_leaks=1",
               FM_SOURCE_DIR=str(Path(__file__).resolve().parents[2]))
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "PASSED" in out, out[-2000:]


@pytest.fixture(scope="module")
def platform_pg(pg, module_platform):
    sets = {"store.backend": "postgres", "store.url": pg.url, "pipeline.device_rate": "0"}
    return module_platform("pgstore", sets=sets)


def pg_rows(pg, prefix):
    out = pg.psql(f"SELECT device_id || '|' || measurement_id FROM measurements "
                  f"WHERE device_id LIKE '{prefix}%'")
    return {tuple(x.split("|")) for x in out.split()}


def test_serve_on_postgres(pg, platform_pg):
    p = platform_pg
    r = subprocess.run([p.bin, "sim", "--data", str(p.data), "--devices", "5", "--prefix", "pga",
                        "--rate", "5", "--duration", "4", "--provision", "--drain", "10",
                        "--seed", "2"],
                       capture_output=True, text=True, timeout=180, cwd=p.workdir, env=p.env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = pg_rows(pg, "pga")
    assert len(rows) >= 60, len(rows)
    # The lake export reads the same rows from PostgreSQL.
    wait_for(lambda: {(x["device_id"], x["measurement_id"]) for _, x in p.lake_records("raw")}
             >= rows, 60, interval=0.5, msg="every measurement in the lake")
    # The device registry is there too (provisioned by claim).
    assert int(pg.psql("SELECT count(*) FROM devices WHERE id LIKE 'pga%'")) == 5




def test_postgres_restart_loses_nothing(pg, platform_pg, tmp_path):
    """Devices with an outbox stream while the server restarts: every
    measurement answered ok is a row; those in the batch the restart broke
    were answered `unavailable` and sent again from the outbox."""
    p = platform_pg
    devs = ["pgr-1", "pgr-2", "pgr-3"]
    for d in devs:
        p.add_device(d)
    runs = start_device_runs(p, devs, tmp_path, count=400, interval="0.02", timeout="2")
    wait_for(lambda: len(pg_rows(pg, "pgr")) >= 60, 60, interval=0.2, msg="traffic flowing")
    pg.restart()
    at_restart = len(pg_rows(pg, "pgr"))
    ok, errors = device_run_results(runs)
    rows = pg_rows(pg, "pgr")
    assert len(ok) >= 300, (len(ok), errors[:5])
    assert len(rows) > at_restart + 100, (at_restart, len(rows))  # traffic went on after it
    # The restart did reach the pipeline: a batch failed and was answered
    # `unavailable` (the devices' outboxes sent it again), then commits
    # resumed on a new connection.
    log = "".join(open(f).read() for f in p.log_paths)
    assert "commit failed; replying unavailable" in log and "commits succeed again" in log
    lost = ok - rows
    assert not lost, f"{len(lost)} acknowledged measurements missing, e.g. {sorted(lost)[:3]}"
    # While the server was away the answers were `unavailable`, never `ok`.
    assert all(code == "unavailable" for _, _, code in errors), errors[:5]
