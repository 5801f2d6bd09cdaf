"""Device SDK v2 (`fleetml device run`): the on-disk outbox survives kill -9
of the device and a broker outage, with every measurement stored exactly
once; and the claim flow onboards a device once.

The device process is the real CLI driving the SDK; the outcome is checked
in the platform's database and in the device's outbox directory.
"""

import json
import os
import re
import signal
import subprocess
import time

from helpers import pid_alive, wait_for

RESULT_RE = re.compile(r"^(m-[A-Za-z0-9._:-]+) (ok|error|dropped|timeout)\b")


class DeviceRun:
    """`fleetml device run ...` in the background, stdout to a file."""

    def __init__(self, platform, *args, name="run"):
        self.platform = platform
        self.out_path = platform.workdir / f"device-{name}.out"
        self.err_path = platform.workdir / f"device-{name}.err"
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(
            [platform.bin, "device", "run", *args, "--data", str(platform.data)],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err,
            env=platform.env, cwd=platform.workdir, start_new_session=True)

    def lines(self):
        return self.out_path.read_text(errors="replace").splitlines()

    def results(self):
        """[(measurement id, status)] in the order printed."""
        out = []
        for line in self.lines():
            m = RESULT_RE.match(line)
            if m:
                out.append((m.group(1), m.group(2)))
        return out

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"device run did not finish within {timeout}s\n{self.tail()}")

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self._out.close()
        self._err.close()

    def tail(self, n=30):
        err = self.err_path.read_text(errors="replace").splitlines()[-n:]
        return "stdout:\n" + "\n".join(self.lines()[-n:]) + "\nstderr:\n" + "\n".join(err)


def outbox_ids(state_dir):
    d = state_dir / "outbox"
    if not d.is_dir():
        return set()
    return {p.name[:-len(".json")] for p in d.iterdir() if p.name.endswith(".json")}


def outbox_files(state_dir):
    d = state_dir / "outbox"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def assert_each_stored_once(p, device_id, ids):
    rows = dict(p.query("SELECT measurement_id, count(*) FROM measurements WHERE device_id = ? "
                        "GROUP BY measurement_id", device_id))
    missing = sorted(i for i in ids if rows.get(i, 0) == 0)
    dup = sorted(i for i, n in rows.items() if n != 1)
    extra = sorted(set(rows) - set(ids))
    assert not missing, f"measurements lost: {missing}"
    assert not dup, f"measurements stored more than once: {dup}"
    assert not extra, f"rows for ids the device never wrote: {extra}"


def test_outbox_survives_kill9(make_platform):
    dev = "dev-sdk-kill"
    p = make_platform(devices=[dev], name="sdkkill")
    state = p.device_dir(dev)
    first = DeviceRun(p, dev, "--count", "200", "--interval", "0.02", "--timeout", "2",
                      name="first")
    try:
        wait_for(lambda: len(first.results()) >= 10 or first.proc.poll() is not None, 30,
                 msg="the first results")
        assert first.proc.poll() is None, f"device run exited early\n{first.tail()}"
    finally:
        # kill -9 in the middle of the stream: some measurements are in
        # flight, some only on disk.
        first.kill()
    answered1 = first.results()
    assert all(st == "ok" for _, st in answered1), answered1
    leftovers = outbox_ids(state)
    written = {i for i, _ in answered1} | leftovers
    assert len(answered1) < 200

    second = DeviceRun(p, dev, "--count", "5", "--interval", "0.02", "--timeout", "2",
                       name="second")
    rc = second.wait(90)
    assert rc == 0, f"restarted device run exited {rc}\n{second.tail()}"
    answered2 = second.results()
    assert all(st == "ok" for _, st in answered2), answered2
    ids2 = [i for i, _ in answered2]
    # Exactly-once callback in normal operation: no id printed twice by one run.
    assert len(ids2) == len(set(ids2)), ids2
    # Everything left in the outbox was resent with its original id and answered.
    assert leftovers <= set(ids2), sorted(leftovers - set(ids2))
    written |= set(ids2)
    assert outbox_files(state) == [], outbox_files(state)
    assert_each_stored_once(p, dev, written)


def test_outbox_survives_broker_outage(make_platform):
    dev = "dev-sdk-outage"
    n = 40
    p = make_platform(devices=[dev], name="sdkoutage")
    state = p.device_dir(dev)
    run = DeviceRun(p, dev, "--count", str(n), "--interval", "0.1", "--timeout", "2",
                    name="outage")
    try:
        wait_for(lambda: len(run.results()) >= 5 or run.proc.poll() is not None, 30,
                 msg="the first results")
        assert run.proc.poll() is None, f"device run exited early\n{run.tail()}"
        old = p.healthz()["broker_pid"]
        os.kill(old, signal.SIGKILL)

        def new_pid():
            pid = p.healthz().get("broker_pid")
            return pid if isinstance(pid, int) and pid != old and pid_alive(pid) else None
        p.broker_pids.add(wait_for(new_pid, 30, interval=0.1, msg="a restarted broker"))
        rc = run.wait(120)
    finally:
        run.kill()
    assert rc == 0, f"device run exited {rc}\n{run.tail()}"
    results = run.results()
    ids = [i for i, _ in results]
    assert all(st == "ok" for _, st in results), results
    assert len(ids) == len(set(ids)) == n, (len(ids), len(set(ids)))
    assert outbox_files(state) == [], outbox_files(state)
    assert_each_stored_once(p, dev, set(ids))


def test_claim_flow_onboards_once(make_platform):
    p = make_platform(name="sdkclaim")
    p.run("template", "add", "sdkt", "--tenant", "demo-hospital", "--data", str(p.data))
    p.run("template", "claim-cert", "sdkt", "--data", str(p.data))
    serial = "SDK-0001"
    state = p.data / "sim" / serial

    def run_once(name):
        r = DeviceRun(p, "--claim", "sdkt", "--serial", serial, "--count", "3",
                      "--interval", "0.05", "--timeout", "2", name=name)
        try:
            rc = r.wait(90)
        finally:
            r.kill()
        assert rc == 0, f"device run --claim exited {rc}\n{r.tail()}"
        return r

    first = run_once("claim1")
    assert any("claiming a certificate" in line for line in first.lines()), first.tail()
    ident = json.loads((state / "identity.json").read_text())
    dev = ident["device_id"]
    assert dev == "sdkt-sdk-0001", ident
    for name in ("device.crt", "device.key", "ca.crt"):
        assert (state / name).is_file(), name
    assert (state / "device.key").stat().st_mode & 0o777 == 0o600
    crt = (state / "device.crt").read_bytes()
    key = (state / "device.key").read_bytes()

    second = run_once("claim2")
    assert not any("claiming a certificate" in line for line in second.lines()), second.tail()
    assert (state / "device.crt").read_bytes() == crt, "certificate changed on restart"
    assert (state / "device.key").read_bytes() == key, "key changed on restart"
    ids = {i for i, _ in first.results()} | {i for i, _ in second.results()}
    assert len(ids) == 6
    assert outbox_files(state) == []
    assert_each_stored_once(p, dev, ids)
    # Let the platform settle so teardown does not race a late write.
    time.sleep(0.1)
