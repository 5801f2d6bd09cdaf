"""Broker supervision (issue acceptance item 8): serve restarts a mosquitto
child that died and devices get service again."""

import os
import signal

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
