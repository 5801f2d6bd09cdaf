"""Broker supervision (issue acceptance item 8): serve restarts a mosquitto
child that died and devices get service again."""

import json
import os
import pwd
import signal
import stat
import subprocess
import time

from helpers import make_measurement, metric_value, pid_alive, unique_id, wait_for

DEV = "dev-supervised"


def test_broker_killed_is_restarted(make_platform, devices):
    p = make_platform(devices=[DEV], name="superv")
    dev = devices(p, DEV, reconnect=True).connect()
    assert all(c < 0x80 for c in dev.subscribe(dev.results_topic))
    first, _ = dev.measure(make_measurement(unique_id("pre")))
    assert first.json()["status"] == "ok"

    old = p.healthz()["broker_pid"]
    assert isinstance(old, int) and pid_alive(old)
    restarts0 = metric_value(p.metrics(), "fleetml_broker_restarts_total")
    assert restarts0 is not None, "fleetml_broker_restarts_total missing from /metrics"

    connacks = len(dev.connacks)
    os.kill(old, signal.SIGKILL)

    def new_pid():
        pid = p.healthz().get("broker_pid")
        return pid if isinstance(pid, int) and pid != old and pid_alive(pid) else None
    new = wait_for(new_pid, 20, interval=0.1, msg="a new broker_pid in /healthz")
    p.broker_pids.add(new)
    assert p.proc.poll() is None, "serve died with its broker"
    wait_for(lambda: metric_value(p.metrics(), "fleetml_broker_restarts_total") > restarts0,
             10, msg="fleetml_broker_restarts_total to increase")
    p.wait_ready(timeout=20)

    dev.wait_connected(20, after=connacks)
    mid = unique_id("post")
    since = dev.mark()

    # The service may still be resubscribing to the new broker; a device
    # repeats an unanswered measurement (same id), which is idempotent.
    def answered():
        got = dev.messages_matching(lambda m: m.json().get("id") == mid, since)
        if not got:
            dev.publish(make_measurement(mid))
        return got
    got = wait_for(answered, 15, interval=1.0, msg="a reply through the restarted broker")
    assert got[0].json()["status"] == "ok", got[0].payload
    assert p.count_measurements(DEV, mid) == 1


def test_frozen_broker_loses_no_reply(make_platform):
    """The broker stops reading (SIGSTOP) in the middle of a closed loop.
    The service's replies back up in its socket (the writes that cannot
    finish are left to the client's network thread) and come out when the
    broker runs again: every measurement answered, each stored once."""
    p = make_platform(name="frozen", start=False)
    # A closed loop sends faster than the default per-device limits allow.
    p.start(extra_args=("--set", "pipeline.device_rate=0",
                        "--set", "pipeline.device_bytes_rate=0"))
    broker = p.healthz()["broker_pid"]
    sim = subprocess.Popen(
        [p.bin, "sim", "--data", str(p.data), "--devices", "20", "--prefix", "fz",
         "--inflight", "40", "--duration", "10", "--provision", "--timeout", "60",
         "--drain", "60", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=p.workdir, env=p.env)
    try:
        stored = "SELECT COUNT(*) FROM measurements WHERE device_id LIKE 'fz%'"
        wait_for(lambda: p.query(stored)[0][0] >= 200, 90, interval=0.1,
                 msg="the closed loop to be under way")
        os.kill(broker, signal.SIGSTOP)
        try:
            # The length of the fault, not a wait for a result: long enough
            # for the replies in flight (800) to fill the socket's buffer.
            time.sleep(2)
        finally:
            os.kill(broker, signal.SIGCONT)
        out, err = sim.communicate(timeout=240)
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait()
    assert sim.returncode == 0, err[-2000:]
    res = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
    assert res["errors"] == 0 and res["timeouts"] == 0, res
    assert res["ok"] == res["sent"] and res["ok"] >= 200, res
    assert p.query(stored)[0][0] == res["ok"]
    assert p.proc.poll() is None


def _answered(p, devices, dev_id):
    dev = devices(p, dev_id, reconnect=True).connect()
    assert all(c < 0x80 for c in dev.subscribe(dev.results_topic))
    reply, _ = dev.measure(make_measurement(unique_id("t")))
    assert reply.json()["status"] == "ok", reply.payload


def test_service_socket_is_the_brokers_alone(make_platform, devices):
    """By default the service reaches its broker over a Unix socket in a
    directory only the broker's user may enter, and the plugin admits it
    there without a certificate."""
    p = make_platform(devices=["dev-socket"], name="sock", traversable=True)
    sockdir = p.data / "broker" / "service"
    st = os.stat(sockdir)
    assert stat.S_IMODE(st.st_mode) == 0o700
    conf = (p.data / "broker" / "mosquitto.conf").read_text()
    owner = conf.split("user ", 1)[1].split("\n", 1)[0]
    assert st.st_uid == pwd.getpwnam(owner).pw_uid
    assert f"listener 0 {sockdir}/mqtt.sock\n" in conf
    assert f"plugin_opt_service_socket {sockdir}/mqtt.sock\n" in conf
    _answered(p, devices, "dev-socket")
    log = p.data / "broker" / "mosquitto.log"
    wait_for(lambda: "accepted service (unix socket) 'fleetml-service'" in log.read_text(), 10,
             msg="the service admitted on its socket")


def test_service_over_tls_when_asked(make_platform, devices):
    """broker.service_transport = tls: no socket listener, and the service
    comes in on the loopback TLS listener with its certificate."""
    p = make_platform(devices=["dev-tls-svc"], name="tlssvc", start=False)
    p.start(extra_args=("--set", "broker.service_transport=tls"))
    conf = (p.data / "broker" / "mosquitto.conf").read_text()
    assert "listener 0 " not in conf and "plugin_opt_service_socket" not in conf
    _answered(p, devices, "dev-tls-svc")
    log = (p.data / "broker" / "mosquitto.log").read_text()
    assert "accepted service 'fleetml-service' (cn 'fleetml-service'" in log
    assert "unix socket" not in log
