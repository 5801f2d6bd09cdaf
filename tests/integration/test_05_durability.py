"""Process lifecycle and durability (issue acceptance item 7, plus clean
shutdown): an `ok` reply is a promise that the measurement is committed and
will reach the lake exactly once, even across `kill -9` of serve."""

import os
import threading
from collections import Counter

import pytest

from helpers import (TENANT, check_lake_layout, make_measurement, pid_alive, unique_id,
                     wait_for)

DEV = "dev-stream"


def test_sigterm_exits_cleanly_and_stops_broker(make_platform):
    p = make_platform()
    broker = p.healthz()["broker_pid"]
    assert isinstance(broker, int) and pid_alive(broker)
    rc = p.stop(timeout=15)
    assert rc == 0, f"serve exited {rc} on SIGTERM\n{p.log_tail()}"
    wait_for(lambda: not pid_alive(broker), 5, msg=f"broker {broker} to exit with serve")


class Stream:
    """Publishes a measurement every ~10 ms from a thread and records which
    ids were answered `ok`."""

    def __init__(self, dev):
        self.dev = dev
        self.sent = []
        self.attempts = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(0.01):
            mid = unique_id("s")
            with self.lock:
                self.attempts += 1
            try:
                self.dev.publish(make_measurement(mid))
            except AssertionError:
                continue  # not connected right now; keep trying
            with self.lock:
                self.sent.append(mid)

    def start(self):
        self.thread.start()

    def finish(self):
        self.stop.set()
        self.thread.join(10)

    def n_attempts(self):
        with self.lock:
            return self.attempts

    def ok_ids(self):
        return {m.json()["id"] for m in self.dev.messages_matching(
            lambda m: m.topic == self.dev.results_topic and m.json().get("status") == "ok")}


def lake_counts(p, device_id):
    recs = p.lake_records("raw")
    return Counter(r["measurement_id"] for _, r in recs if r.get("device_id") == device_id), recs


@pytest.mark.parametrize("broker_user", ["same", "dropped"])
def test_kill9_serve_keeps_every_ok_measurement(make_platform, devices, broker_user):
    # "same": the broker runs as our user and dies with serve (parent-death
    # signal).  "dropped": started as root in a directory the `mosquitto`
    # user can reach, the broker switches user, which clears the
    # parent-death signal, so it survives kill -9 of serve and still holds
    # the ports when serve restarts.
    p = make_platform(devices=[DEV], name=f"durable-{broker_user}",
                      traversable=broker_user == "dropped")
    old_broker = p.healthz()["broker_pid"]
    broker_uid = os.stat(f"/proc/{old_broker}").st_uid
    if broker_user == "dropped" and broker_uid == os.getuid():
        why = [ln for ln in p.log_tail(200).splitlines() if "broker runs as" in ln]
        pytest.skip("broker did not switch user, so the orphan case cannot be set up: "
                    + (why[0] if why else "not root, or no `mosquitto` user"))
    dev = devices(p, DEV, reconnect=True).connect()
    assert all(c < 0x80 for c in dev.subscribe(dev.results_topic))

    stream = Stream(dev)
    stream.start()
    try:
        wait_for(lambda: len(stream.ok_ids()) >= 40, 20, msg="40 ok replies before the kill")
        p.kill9()
        survived = pid_alive(old_broker)
        # The device keeps trying while serve is dead (its broker may have
        # died with it, so not every attempt reaches a broker).
        killed_at = stream.n_attempts()
        wait_for(lambda: stream.n_attempts() >= killed_at + 20, 10,
                 msg="the stream to keep going after the kill")
    finally:
        stream.finish()
    ok_before = stream.ok_ids()
    assert ok_before, "no ok replies at all"

    # The orphaned broker may still hold the ports; serve must cope.
    connacks = len(dev.connacks)
    p.start(wait_ready=True, timeout=40)
    new_broker = p.healthz()["broker_pid"]
    assert new_broker != old_broker and pid_alive(new_broker)
    assert not pid_alive(old_broker), f"old broker {old_broker} still running after restart"

    # Every measurement that was answered ok survived the crash, once.
    rows = p.query("SELECT measurement_id FROM measurements WHERE device_id = ?", DEV)
    stored = Counter(r[0] for r in rows)
    missing = sorted(ok_before - set(stored))
    assert not missing, f"{len(missing)} acknowledged measurements lost, e.g. {missing[:5]}"
    assert all(n == 1 for n in stored.values())
    print(f"before kill -9: {len(ok_before)} ok replies of {len(stream.sent)} published "
          f"({stream.n_attempts()} attempts); {len(stored)} rows after restart; "
          f"old broker survived the kill: {survived}")

    # The device gets service again after the restart (reconnecting if the
    # broker was replaced).
    mid = unique_id("after")
    since = dev.mark()

    def answered():
        if not dev.messages_matching(lambda m: m.json().get("id") == mid, since):
            try:
                dev.publish(make_measurement(mid))
            except AssertionError:
                pass
            return dev.messages_matching(lambda m: m.json().get("id") == mid, since)
        return True
    try:
        wait_for(answered, 30, interval=1.0, msg="a reply after the restart")
    except AssertionError as e:
        raise AssertionError(f"{e}; connacks before restart {connacks}, "
                             f"now {dev.connacks}, disconnects {dev.disconnects}") from None
    reply = dev.messages_matching(lambda m: m.json().get("id") == mid, since)[0].json()
    assert reply["status"] == "ok", reply
    ok_all = stream.ok_ids()
    assert mid in ok_all

    # The lake (rolling every second) catches up with every acknowledged
    # measurement, each exactly once.
    def in_lake():
        counts, _ = lake_counts(p, DEV)
        return all(counts[m] >= 1 for m in ok_all) and counts
    try:
        counts = wait_for(in_lake, 30, interval=0.25, msg="all ok measurements in the lake")
    except AssertionError:
        counts, _ = lake_counts(p, DEV)
        raise AssertionError(f"not in lake after 30 s: {sorted(ok_all - set(counts))[:10]} "
                             f"({len(ok_all - set(counts))} of {len(ok_all)})") from None
    dups = {m: n for m, n in counts.items() if n > 1}
    assert not dups, f"duplicated in the lake: {dups}"
    check_lake_layout(p)

    # After a clean stop, an explicit flush exports what is left and still
    # duplicates nothing.
    assert p.stop() == 0, p.log_tail()
    r = p.run("lake", "flush", "--data", str(p.data))
    counts, recs = lake_counts(p, DEV)
    dups = {m: n for m, n in counts.items() if n > 1}
    assert not dups, f"duplicated in the lake after flush: {dups}\n{r.stdout}{r.stderr}"
    rows = p.query("SELECT measurement_id FROM measurements WHERE device_id = ?", DEV)
    assert set(counts) == {r[0] for r in rows}, "lake and database disagree after flush"
    assert not list((p.data / "lake" / "raw").rglob(".*")), "hidden/temporary files under raw/"
    check_lake_layout(p)

    for _, rec in recs:
        if rec.get("device_id") != DEV:
            continue
        for k in ("seq", "device_id", "tenant", "measurement_id", "received_at", "model",
                  "measurement", "result"):
            assert k in rec, f"lake record lacks {k}: {sorted(rec)}"
        assert rec["tenant"] == TENANT
        assert isinstance(rec["measurement"], dict) and rec["measurement"]["id"] == rec["measurement_id"]
        assert isinstance(rec["result"], dict)
        assert rec["model"].startswith("viscosity@")
    seqs = [rec["seq"] for _, rec in recs]
    assert len(seqs) == len(set(seqs)), "a seq appears twice in the lake"
