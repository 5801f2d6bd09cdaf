"""Fixtures for the black-box tests of `fleetml serve`.

`platform` is one initialised data directory with a running `serve`, shared
by every test that does not disturb it (each such test uses its own device
ids, registered up front in SHARED_DEVICES).  Tests that kill or restart
processes use `make_platform`, which gives each test its own data
directory, ports and processes.  Every process started is killed in
teardown, including a broker orphaned by `kill -9` of serve.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import Device, Platform  # noqa: E402

DEFAULT_BIN = "/work/main/build-test/fleetml"

# Every fleetml the tests run aborts if a command parses an option its
# table (the help) does not list (src/cli/cli.h).
os.environ["FLEETML_CLI_STRICT"] = "1"

# Devices of the shared platform.  One per test (or per purpose) so that
# counts "by device" in the database are not disturbed by other tests.
SHARED_DEVICES = [
    "dev-ok", "dev-latency", "dev-err", "dev-a", "dev-b", "dev-c", "dev-dup", "dev-corr",
    "dev-http", "dev-lake", "dev-impostor", "dev-rogue", "dev-nocert",
]

_platforms = []

# FM_IT_STORE=postgres: one PostgreSQL server for the session, one database
# per platform (helpers.store_database).
_pg = None
if os.environ.get("FM_IT_STORE") == "postgres":
    import helpers as _helpers
    from pgserver import PgServer as _PgServer
    _pg_count = [0]

    def _new_database():
        global _pg
        if _pg is None:
            _pg = _PgServer(dbname="fleetml").start()
        _pg_count[0] += 1
        name = f"it{_pg_count[0]}"
        _pg.psql(f"CREATE DATABASE {name}")
        return f"postgres://postgres@127.0.0.1:{_pg.port}/{name}"

    _helpers._store_database = _new_database


# FM_IT_LAKE=s3: one S3 store (s3rver behind the SigV4 gate) for the
# session; each platform writes under its own prefix (helpers.Platform).
_gate = None
if os.environ.get("FM_IT_LAKE") == "s3":
    import helpers as _helpers_lake
    from s3gate import S3Gate as _S3Gate
    _gate = _S3Gate(Path(tempfile.mkdtemp(prefix="fleetml-it-s3-", dir="/tmp"))).start()
    _helpers_lake._lake_gate = _gate


def pytest_collection_modifyitems(config, items):
    """Tests of SQLite's own files and fault injection skip on PostgreSQL."""
    if os.environ.get("FM_IT_STORE") != "postgres":
        return
    skip = pytest.mark.skip(reason="SQLite-specific (FM_IT_STORE=postgres)")
    for item in items:
        if item.get_closest_marker("sqlite_only"):
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "sqlite_only: exercises SQLite's files or its VFS")


@pytest.fixture(scope="session")
def fm_bin():
    b = os.environ.get("FM_BIN") or DEFAULT_BIN
    if not os.path.isabs(b):
        b = os.path.abspath(b)
    if not (os.path.isfile(b) and os.access(b, os.X_OK)):
        pytest.fail(f"fleetml binary not found at {b} (set FM_BIN)", pytrace=False)
    return b


@pytest.fixture(scope="session")
def platform(fm_bin, tmp_path_factory):
    p = Platform(fm_bin, tmp_path_factory.mktemp("shared"), node_id="it-shared")
    _platforms.append(p)
    try:
        p.init()
        for d in SHARED_DEVICES:
            p.add_device(d)
        p.start()
        yield p
    finally:
        p.cleanup()
        _platforms.remove(p)


@pytest.fixture
def make_platform(fm_bin, tmp_path):
    """Factory for private platforms: make_platform(devices=[...], start=True)."""
    made = []
    scratch = []

    def make(devices=(), start=True, name="private", traversable=False):
        if traversable:
            # pytest's base temp dir is 0700, so a broker started as root
            # cannot switch to the `mosquitto` user; this one can.
            wd = Path(tempfile.mkdtemp(prefix=f"fleetml-it-{name}-", dir="/tmp"))
            os.chmod(wd, 0o711)
            scratch.append(wd)
        else:
            wd = tmp_path / f"{name}{len(made)}"
            wd.mkdir(parents=True)
        p = Platform(fm_bin, wd, node_id=f"it-{name}")
        made.append(p)
        _platforms.append(p)
        p.init()
        for d in devices:
            p.add_device(d)
        if start:
            p.start()
        return p

    yield make
    for p in made:
        p.cleanup()
        _platforms.remove(p)
    for wd in scratch:
        shutil.rmtree(wd, ignore_errors=True)


@pytest.fixture(scope="module")
def module_platform(fm_bin, tmp_path_factory):
    """Factory for one platform per test module, for tests that change
    registry state (templates, revocations) the shared platform must not
    see: module_platform(name, devices=[...], sets={...}, setup=fn).
    setup(p) runs after init and device registration, before serve."""
    made = []

    def make(name, devices=(), sets=None, setup=None, start=True):
        p = Platform(fm_bin, tmp_path_factory.mktemp(name), node_id=f"it-{name}")
        p.extra_sets.update(sets or {})
        made.append(p)
        _platforms.append(p)
        p.init()
        for d in devices:
            p.add_device(d)
        if setup is not None:
            setup(p)
        if start:
            p.start()
        return p

    yield make
    for p in made:
        p.cleanup()
        _platforms.remove(p)


@pytest.fixture
def devices():
    """Factory for MQTT devices that are disconnected in teardown:
    devices(platform, device_id, **kw) -> Device (not yet connected)."""
    made = []

    def make(platform, device_id, **kw):
        d = Device(platform, device_id, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture
def connected(devices):
    """connected(platform, device_id) -> Device connected and subscribed to
    its results topic."""
    def make(platform, device_id, **kw):
        d = devices(platform, device_id, **kw).connect()
        codes = d.subscribe(d.results_topic)
        assert all(c < 0x80 for c in codes), f"SUBACK {codes} for own results topic"
        return d
    return make


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for p in list(_platforms):
            rep.sections.append((f"fleetml log {p.workdir.name}", p.log_tail(80)))


def pytest_sessionfinish(session, exitstatus):
    # Last line of defence if a fixture's teardown did not run.
    for p in list(_platforms):
        p.cleanup()
    if _pg is not None:
        _pg.stop()
    if _gate is not None:
        _gate.stop()
        shutil.rmtree(_gate.dir.parent, ignore_errors=True)
