"""`make run` (scripts/run-demo): a quiet, truthful start. On a new data
directory the demo prints init's report, then the addresses and the admin's
password exactly once, then its devices' figures; no warning or error while
the demo devices onboard themselves by claim and stream."""

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from helpers import free_ports

ROOT = Path(__file__).resolve().parents[2]


def test_make_run_starts_quietly(fm_bin, tmp_path):
    ports = free_ports(4)
    env = dict(os.environ, FM_DEMO_DEVICES="3", FM_DEMO_INIT_ARGS=(
        f"--set broker.bind=127.0.0.1 --set broker.port={ports[0]} "
        f"--set broker.service_port={ports[1]} --set http.port={ports[2]} "
        f"--set ops.port={ports[3]}"))
    proc = subprocess.Popen([str(ROOT / "scripts" / "run-demo"), str(Path(fm_bin).parent),
                             str(tmp_path / "var")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)
    lines = []

    def read():
        for line in iter(proc.stdout.readline, ""):
            lines.append(line)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def streaming():
        return any(l.startswith("t=") and "connected=3/3" in l and " ok=0 " not in l
                   for l in list(lines))
    try:
        # Running: every device connected and answered, in the figures line.
        deadline = time.monotonic() + 90
        while not streaming():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the demo did not stream; its output:\n" + "".join(lines))
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
    out = "".join(lines)
    assert out.count("fleetml is running") == 1, out
    assert out.count("password ") == 1 and "admin password:" not in out, out
    assert f"http://127.0.0.1:{ports[2]}/" in out
    banner_at = out.index("fleetml is running")
    assert out.index("created tenant 'demo-hospital'") < banner_at < out.index("t=")
    bad = [l for l in lines if any(w in l.lower() for w in (
        '"level":"warn"', '"level":"error"', "warning", "refused", "not authorized",
        "fleetml serve exited"))]
    assert not bad, bad
    # Nothing above warnings from the devices' log on the console.
    assert not [l for l in lines if '"level":"info"' in l], out
