"""An external broker (docs/operations.md, "An external broker"): two
fleetml nodes in broker.mode = external share one Mosquitto that they do
not run, started from deploy/mosquitto/fleetml-external.conf (paths and
ports filled in) with the fleetml_auth.so plugin and no registry file; the
store is PostgreSQL.

- each node connects as "fleetml-service.<node id>" and sends the plugin
  the whole registry; the shared subscription spreads the devices'
  measurements over both nodes, and every device is answered;
- a device added through node 2 is admitted, and a revocation through
  node 1 cuts it within 1 s;
- the broker restarted: it comes back with no registry, the nodes
  reconnect and send theirs, devices reconnect and are answered again;
- `kill -9` of one node: the other answers every device, and no
  acknowledged measurement is lost;
- a second process started with a node id already in use: the broker hands
  the session back and forth, both back off to the slow pace instead of
  reconnecting ten times a second, the log says why, and the first node is
  answering again once the second stops.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers import (Device, Platform, device_run_results, free_ports, join_cluster,
                     make_measurement, metric_value, on_postgres, start_device_runs, unique_id,
                     wait_for)
from pgserver import PgServer

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "deploy" / "mosquitto" / "fleetml-external.conf"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

pytestmark = pytest.mark.skipif(on_postgres(), reason="starts its own PostgreSQL")


class ExternalBroker:
    """Mosquitto started from the deployment file, as an operator would."""

    def __init__(self, workdir, pki, plugin):
        self.workdir = workdir
        self.dev_port, self.svc_port = free_ports(2)
        self.proc = None
        text = CONF.read_text()
        for a, b in [("user mosquitto", "user root"),
                     ("/var/lib/mosquitto/", f"{workdir}/"),
                     ("log_dest syslog", "log_dest stderr\nlog_type information"),
                     ("/usr/local/lib/fleetml/fleetml_auth.so", plugin),
                     ("/etc/mosquitto/fleetml/", f"{pki}/"),
                     ("plugin_opt_device_rate 20", "plugin_opt_device_rate 0"),
                     ("listener 8883", f"listener {self.dev_port} 127.0.0.1"),
                     ("listener 8884", f"listener {self.svc_port} 127.0.0.1")]:
            assert a in text, a
            text = text.replace(a, b)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(text)
        self.log_path = workdir / "mosquitto.log"

    def start(self):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for(lambda: "fleetml_auth: loaded" in self.log(), 10, msg="mosquitto with plugin")
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def log(self):
        return self.log_path.read_text(errors="replace")


class Setup:
    def __init__(self, fm_bin, wd, pg):
        self.pg = pg
        self.bin = fm_bin
        plugin = str(Path(os.environ.get("FM_BUILD", Path(fm_bin).parent)) / "fleetml_auth.so")
        self.nodes = []
        for i in (1, 2):
            (wd / f"x{i}").mkdir()
            self.nodes.append(Platform(fm_bin, wd / f"x{i}", node_id=f"x{i}"))
        first = self.nodes[0]
        self.broker = ExternalBroker(wd, first.data / "pki", plugin)
        for n in self.nodes:
            self.configure(n)
        first.init()
        for n in self.nodes[1:]:
            join_cluster(first, n)

    def configure(self, n):
        n.pg_url = self.pg.url
        n.broker_port = self.broker.dev_port  # devices' port: the shared broker
        n.extra_sets.update({
            "store.backend": "postgres", "store.url": self.pg.url, "pipeline.device_rate": "0",
            "broker.mode": "external",
            "broker.url": f"mqtts://127.0.0.1:{self.broker.svc_port}"})

    def start(self):
        self.broker.start()
        for n in self.nodes:
            n.start()
        return self

    def cleanup(self):
        for n in self.nodes:
            n.cleanup()
        self.broker.stop()


@pytest.fixture(scope="module")
def ext(fm_bin, tmp_path_factory):
    wd = tmp_path_factory.mktemp("external")
    pg = PgServer(dbname="external").start()
    s = None
    try:
        s = Setup(fm_bin, wd, pg).start()
        yield s
    finally:
        if s:
            s.cleanup()
        pg.stop()


def admitted(node, device_id):
    """Waits until the shared broker admits the device (a node has pushed it
    to the plugin), with a fresh client per attempt."""
    def once():
        d = Device(node, device_id)
        try:
            return d.try_connect(timeout=5) == "connected"
        finally:
            d.close()
    wait_for(once, 10, interval=0.1, msg=f"{device_id} admitted by the shared broker")


def stored(n):
    return metric_value(n.metrics(), "fleetml_measurements_stored_total") or 0


def test_nodes_share_the_broker_and_every_device_is_answered(ext):
    first = ext.nodes[0]
    log = ext.broker.log()
    for n in ext.nodes:
        assert f"fleetml-service.{n.node_id}" in log, log[-3000:]
    ids = [f"ext-{i}" for i in range(4)]
    for d in ids:
        first.add_device(d)
    before = [stored(n) for n in ext.nodes]
    devs = []
    try:
        for d in ids:
            admitted(first, d)
            dev = Device(first, d)
            dev.connect()
            dev.subscribe(dev.results_topic)
            devs.append(dev)
        for _ in range(10):
            for dev in devs:
                m, _ = dev.measure(make_measurement(unique_id()), timeout=10)
                assert m.json()["status"] == "ok", m.json()
    finally:
        for dev in devs:
            dev.close()
    after = [stored(n) for n in ext.nodes]
    gained = [a - b for a, b in zip(after, before)]
    assert sum(gained) == 40, gained
    assert all(g > 0 for g in gained), f"the shared subscription gave one node nothing: {gained}"


def test_device_added_on_node2_revoked_on_node1(ext):
    first, second = ext.nodes
    second.add_device("ext-rev")
    admitted(second, "ext-rev")  # its key and certificate are in node 2's directory
    dev = Device(second, "ext-rev")
    try:
        dev.connect()
        n = len(dev.lost_times)
        t0 = time.monotonic()
        first.cli("device", "revoke", "ext-rev")
        t_end = time.monotonic()
        lost = dev.wait_lost(timeout=5, after=n)
        print(f"cut {lost - t_end:.3f}s after the revoke returned ({t_end - t0:.3f}s command)")
        assert lost - t_end < 1.0, f"cut {lost - t_end:.3f}s after the revoke returned"
    finally:
        dev.close()
    again = Device(second, "ext-rev")
    try:
        assert again.try_connect(timeout=5) not in ("connected", "timeout")
    finally:
        again.close()


def test_broker_restart_gets_the_registry_back(ext):
    first = ext.nodes[0]
    first.add_device("ext-restart")
    admitted(first, "ext-restart")
    dev = Device(first, "ext-restart", reconnect=True)
    try:
        dev.connect()
        dev.subscribe(dev.results_topic)
        n, acks = len(dev.lost_times), len(dev.connacks)
        mark = len(ext.broker.log())
        ext.broker.stop()
        dev.wait_lost(timeout=10, after=n)
        ext.broker.start()
        # A fresh broker has no registry until a node sends it.
        wait_for(lambda: "registry replaced by a snapshot" in ext.broker.log()[mark:], 30,
                 interval=0.1, msg="a node's snapshot installed")
        wait_for(lambda: all(n.http("/readyz")[0] == 200 for n in ext.nodes), 30,
                 interval=0.2, msg="both nodes reconnected (ready)")
        dev.wait_connected(timeout=30, after=acks)
        m, _ = dev.measure(make_measurement(unique_id()), timeout=15)
        assert m.json()["status"] == "ok", m.json()
    finally:
        dev.close()


def test_kill9_of_one_node_the_other_answers(ext, tmp_path):
    first, second = ext.nodes
    ids = [f"ext-k9-{i}" for i in range(3)]
    for d in ids:
        first.add_device(d)
    runs = start_device_runs(first, ids, tmp_path, count=200)
    q = "SELECT count(*) FROM measurements WHERE device_id LIKE 'ext-k9-%'"
    wait_for(lambda: first.query(q)[0][0] >= 60, 60, interval=0.2, msg="traffic flowing")
    second.kill9()
    at_kill = first.query(q)[0][0]
    ok, errors = device_run_results(runs)
    rows = {(d, m) for d, m in first.query(
        "SELECT device_id, measurement_id FROM measurements WHERE device_id LIKE 'ext-k9-%'")}
    assert len(ok) >= 3 * 200 * 0.9, (len(ok), errors[:5])
    assert len(rows) > at_kill + 100, "the surviving node kept answering"
    lost = ok - rows
    assert not lost, f"{len(lost)} acknowledged measurements missing, e.g. {sorted(lost)[:3]}"


def test_duplicate_node_id_backs_off(ext, tmp_path):
    first = ext.nodes[0]
    first.wait_ready()
    (tmp_path / "dup").mkdir()
    dup = Platform(ext.bin, tmp_path / "dup", node_id=first.node_id)
    ext.configure(dup)
    join_cluster(first, dup)
    client = f"as fleetml-service.{first.node_id} "
    mark = len(ext.broker.log())
    try:
        dup.start(wait_ready=False)
        t0 = time.monotonic()
        # Both hold the same client id: each connection takes the session
        # from the other. Watch the broker for a while.
        wait_for(lambda: ext.broker.log()[mark:].count(client) >= 4, 30, interval=0.1,
                 msg="the two processes taking the session from each other")
        wait_for(lambda: time.monotonic() - t0 >= 10, 15, interval=0.2, msg="10 s")
        connects = ext.broker.log()[mark:].count(client)
        elapsed = time.monotonic() - t0
        print(f"{connects} connections as {first.node_id} in {elapsed:.1f} s")
        # Reconnecting after 100 ms each time: ~150 in 10 s. Backing off to
        # 2 s: ~20 for the two together.
        assert connects <= 50, f"{connects} connections in {elapsed:.1f} s"
        logs = "".join(p.read_text(errors="replace") for n in (first, dup) for p in n.log_paths)
        assert "same client id (is node.id unique?)" in logs, logs[-3000:]
    finally:
        dup.stop()
        dup.cleanup()
    # Alone again: the first node is back within its slowest retry.
    first.wait_ready(timeout=30)
    first.add_device("ext-dup")
    admitted(first, "ext-dup")
    dev = Device(first, "ext-dup")
    try:
        dev.connect()
        dev.subscribe(dev.results_topic)
        m, _ = dev.measure(make_measurement(unique_id()), timeout=15)
        assert m.json()["status"] == "ok", m.json()
    finally:
        dev.close()
