"""Shared machinery of the soak runs (tests/soak/soak.py).

A soak run is one data directory, one `fleetml serve` (release build), a
fleet of `fleetml device run` processes (the device SDK with its on-disk
outbox: every measurement is resent until answered), sometimes a paho
"probe" device whose every reply is inspected, and a fault injected again
and again while the fleet streams. At the end the fleet is stopped, every
device's outbox is drained by a second `device run --count 1`, serve is
stopped, `fleetml lake flush` exports the rest, and the outcome is checked
against the database and the lake:

  written   every measurement id a device wrote (answered ids + what was
            left in its outbox when it was stopped)
  lost      written but never answered ok, answered ok but not in the
            database, or in the database but not in the lake
  duplicated  rows stored more than once for one (device, id), in the
            database or in the lake

The platform itself comes from tests/integration/helpers.py (Platform,
Device, wait_for, ...), imported, not copied.
"""

import gzip
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))

from helpers import (  # noqa: E402
    Device, Platform, WaitTimeout, make_measurement, metric_value, pid_alive, unique_id,
    wait_for,
)

RESULT_RE = re.compile(r"^(m-[A-Za-z0-9._:-]+) (ok|error|dropped|timeout)\b(?: (\S+))?")


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


class SoakFailure(AssertionError):
    pass


def check(cond, msg):
    if not cond:
        raise SoakFailure(msg)


# --------------------------------------------------------------------------
# Mounts


class Mounts:
    """tmpfs mounts made by a run; all unmounted at the end, whatever happens."""

    def __init__(self):
        self.points = []

    def tmpfs(self, path, size):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                        str(path)], check=True, capture_output=True, text=True)
        self.points.append(path)
        return path

    def tmpfs_over(self, path, size):
        """Mounts a tmpfs over an existing directory, keeping its content."""
        path = Path(path)
        keep = Path(tempfile.mkdtemp(prefix="fleetml-soak-keep-"))
        try:
            if path.exists():
                shutil.copytree(path, keep / "c", symlinks=True)
            self.tmpfs(path, size)
            if (keep / "c").exists():
                for child in (keep / "c").iterdir():
                    dst = path / child.name
                    if child.is_dir():
                        shutil.copytree(child, dst, symlinks=True)
                    else:
                        shutil.copy2(child, dst)
                os.chmod(path, (keep / "c").stat().st_mode & 0o7777)
        finally:
            shutil.rmtree(keep, ignore_errors=True)
        return path

    def unmount_all(self):
        for p in reversed(self.points):
            r = subprocess.run(["umount", str(p)], capture_output=True, text=True)
            if r.returncode != 0:
                log(f"umount {p}: {r.stderr.strip()}; lazy unmount")
                subprocess.run(["umount", "-l", str(p)], capture_output=True)
        self.points = []


class Filler:
    """Fills a file system with one file and keeps it full (a thread tops
    it up every 50 ms, so space freed by the system under test, e.g. a
    deleted spool file, is taken again) until released."""

    def __init__(self, path):
        self.path = Path(path)
        self.stop_ev = threading.Event()
        self.thread = None
        self.bytes = 0
        self.f = None

    def _top_up(self):
        for chunk in (1 << 20, 64 << 10, 4 << 10, 512):
            buf = b"\0" * chunk
            while True:
                try:
                    self.f.write(buf)
                    self.f.flush()
                    self.bytes += chunk
                except OSError:
                    break

    def fill(self):
        self.f = open(self.path, "wb", buffering=0)
        self._top_up()

        def loop():
            while not self.stop_ev.wait(0.05):
                self._top_up()
        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()
        return self.bytes

    def release(self):
        self.stop_ev.set()
        if self.thread:
            self.thread.join(5)
        if self.f:
            self.f.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def statvfs_free(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# --------------------------------------------------------------------------
# Devices: `fleetml device run` with an outbox


class DeviceRun:
    """One `fleetml device run <id>` process; stdout parsed incrementally."""

    def __init__(self, platform, device_id, state_dir, name, interval=0.01, timeout=2.0,
                 count=0):
        self.platform = platform
        self.device_id = device_id
        self.state_dir = Path(state_dir)
        self.out_path = platform.workdir / f"dev-{name}.out"
        self.err_path = platform.workdir / f"dev-{name}.err"
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self._pos = 0
        self._partial = b""
        self.ok = set()
        self.errors = []   # (id, code) for every error result printed
        self.other = []    # timeouts / drops (must not happen with an outbox)
        args = [platform.bin, "device", "run", device_id, "--data", str(platform.data),
                "--state", str(self.state_dir), "--interval", str(interval),
                "--timeout", str(timeout), "--count", str(count)]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=self._err, env=platform.env, cwd=platform.workdir,
                                     start_new_session=True)

    def poll(self):
        """Reads new result lines; returns the number of new ok results."""
        with open(self.out_path, "rb") as f:
            f.seek(self._pos)
            data = f.read()
        self._pos += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        new_ok = 0
        for raw in lines:
            m = RESULT_RE.match(raw.decode(errors="replace"))
            if not m:
                continue
            mid, status, code = m.group(1), m.group(2), m.group(3)
            if status == "ok":
                if mid not in self.ok:
                    new_ok += 1
                self.ok.add(mid)
            elif status == "error":
                self.errors.append((mid, code))
            else:
                self.other.append((mid, status))
        return new_ok

    def pause(self):
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self):
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self, timeout=15):
        """SIGTERM (the run stops taking measurements; what is unanswered
        stays in its outbox)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()
        self.poll()

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout)
        finally:
            self._close()
            self.poll()

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self._close()

    def _close(self):
        for f in (self._out, self._err):
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass

    def stderr_tail(self, n=10):
        try:
            return "\n".join(self.err_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def outbox_ids(state_dir):
    d = Path(state_dir) / "outbox"
    if not d.is_dir():
        return set()
    return {p.name[:-5] for p in d.iterdir() if p.name.endswith(".json")}


class Fleet:
    """N devices streaming through `fleetml device run` (outbox on)."""

    def __init__(self, platform, ids, state_root, interval=0.01, timeout=2.0):
        self.p = platform
        self.ids = list(ids)
        self.state_root = Path(state_root)
        self.interval = interval
        self.timeout = timeout
        self.runs = {}      # device id -> [DeviceRun]
        self.written = {d: set() for d in self.ids}
        self.ok = {d: set() for d in self.ids}
        self.errors = []
        self.other = []
        self._n = 0

    def state_dir(self, dev):
        return self.state_root / dev

    def start(self):
        for d in self.ids:
            self.state_dir(d).mkdir(parents=True, exist_ok=True)
            self._n += 1
            r = DeviceRun(self.p, d, self.state_dir(d), f"{d}-{self._n}",
                          interval=self.interval, timeout=self.timeout)
            self.runs.setdefault(d, []).append(r)

    def current(self):
        return [rs[-1] for rs in self.runs.values() if rs]

    def poll(self):
        n = 0
        for r in self.current():
            n += r.poll()
            dead = r.proc.poll()
            check(dead is None or dead == 0,
                  f"device run {r.device_id} exited {dead}:\n{r.stderr_tail()}")
        return n

    def ok_count(self):
        self.poll()
        return sum(len(r.ok) for rs in self.runs.values() for r in rs)

    def wait_progress(self, n, timeout, what="results"):
        """Waits until n more measurements were answered ok."""
        base = self.ok_count()
        wait_for(lambda: self.ok_count() >= base + n, timeout, interval=0.1,
                 msg=f"{n} more ok {what}")

    def pause(self):
        for r in self.current():
            r.pause()

    def resume(self):
        for r in self.current():
            r.resume()

    def stop(self):
        for r in self.current():
            r.stop()
        self._collect()

    def _collect(self):
        for d, rs in self.runs.items():
            for r in rs:
                self.ok[d] |= r.ok
                self.written[d] |= r.ok | {i for i, _ in r.errors} | {i for i, _ in r.other}
                self.errors.extend(r.errors)
                self.other.extend(r.other)
            self.written[d] |= outbox_ids(self.state_dir(d))
        # Errors and drops were appended for every run again: dedupe.
        self.errors = sorted(set(self.errors))
        self.other = sorted(set(self.other))

    def drain(self, timeout=180):
        """Restarts every device once with --count 1: it resends its outbox
        (same ids) and takes one more measurement, and exits when all of it
        is answered."""
        for d in self.ids:
            self._n += 1
            r = DeviceRun(self.p, d, self.state_dir(d), f"{d}-drain{self._n}",
                          interval=0.01, timeout=self.timeout, count=1)
            self.runs[d].append(r)
        deadline = time.monotonic() + timeout
        for r in self.current():
            left = max(1.0, deadline - time.monotonic())
            try:
                rc = r.wait(left)
            except subprocess.TimeoutExpired:
                r.kill()
                raise SoakFailure(f"draining {r.device_id} did not finish in {timeout}s; "
                                  f"outbox left: {len(outbox_ids(r.state_dir))}\n"
                                  f"{r.stderr_tail()}")
            check(rc == 0, f"drain run of {r.device_id} exited {rc}\n{r.stderr_tail()}")
        self._collect()
        for d in self.ids:
            left = outbox_ids(self.state_dir(d))
            check(not left, f"{d}: outbox not empty after drain: {sorted(left)[:5]}")

    def kill_all(self):
        for rs in self.runs.values():
            for r in rs:
                r.kill()


# --------------------------------------------------------------------------
# The probe: a paho device whose every reply is kept


class Probe:
    """Publishes measurements one id at a time and records every reply."""

    def __init__(self, platform, device_id):
        self.p = platform
        self.dev = Device(platform, device_id, reconnect=True)
        self.dev.connect(15)
        self.dev.subscribe(self.dev.results_topic)
        self.docs = {}       # id -> measurement document (resent unchanged)
        self.replies = []    # (id, status, code, monotonic time)
        self.ok = set()

    @property
    def device_id(self):
        return self.dev.device_id

    def send(self, mid=None, timeout=60):
        if mid is None:
            mid = unique_id("m-probe")
            self.docs[mid] = make_measurement(mid)
        # After a broker or serve restart the paho client reconnects (and
        # re-subscribes) by itself; publish once it is connected.
        deadline = time.monotonic() + timeout
        while True:
            if self.dev.client.is_connected():
                try:
                    self.dev.publish(self.docs[mid])
                    return mid
                except AssertionError:
                    pass
            check(time.monotonic() < deadline, f"probe not connected within {timeout}s")
            time.sleep(0.05)

    def reply(self, mid, since, timeout=15):
        m = self.dev.wait_reply(mid, timeout, since)
        doc = m.json()
        code = (doc.get("error") or {}).get("code")
        self.replies.append((mid, doc.get("status"), code, m.t))
        if doc.get("status") == "ok":
            self.ok.add(mid)
        return doc.get("status"), code

    def measure(self, mid=None, timeout=15, attempts=1):
        """Sends one measurement (new, or again with the same id) and
        waits for its reply; with attempts > 1, resends the same id when no
        reply comes within timeout, as the SDK does."""
        for a in range(attempts):
            since = self.dev.mark()
            mid = self.send(mid)
            try:
                st, code = self.reply(mid, since, timeout)
                return mid, st, code
            except WaitTimeout:
                if a == attempts - 1:
                    raise

    def burst(self, n, timeout=15):
        """Publishes n new measurements back to back; returns
        [(id, status, code)] in sending order."""
        since = self.dev.mark()
        mids = [self.send() for _ in range(n)]
        return [(mid, *self.reply(mid, since, timeout)) for mid in mids]

    def written(self):
        return set(self.docs)

    def close(self):
        self.dev.close()


# --------------------------------------------------------------------------
# HTTP and metrics


def http(p, path, method="GET", timeout=3):
    req = urllib.request.Request(f"http://127.0.0.1:{p.ops_port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def metric(p, name):
    try:
        return metric_value(p.metrics(), name) or 0.0
    except Exception:  # noqa: BLE001 - serve down or restarting
        return None


def readyz(p):
    try:
        return http(p, "/readyz")[0]
    except Exception:  # noqa: BLE001
        return None


def serve_log_text(p):
    out = []
    for lp in p.log_paths:
        try:
            out.append(lp.read_text(errors="replace"))
        except OSError:
            pass
    return "\n".join(out)


# --------------------------------------------------------------------------
# Verification


def db_rows(p):
    """{(device, id): count} from the database (read-only)."""
    con = sqlite3.connect(f"file:{p.db_path}?mode=ro", uri=True, timeout=10)
    try:
        return {(d, m): n for d, m, n in con.execute(
            "SELECT device_id, measurement_id, count(*) FROM measurements "
            "GROUP BY device_id, measurement_id")}
    finally:
        con.close()


def integrity_check(p):
    con = sqlite3.connect(f"file:{p.db_path}?mode=ro", uri=True, timeout=10)
    try:
        return [r[0] for r in con.execute("PRAGMA integrity_check")]
    finally:
        con.close()


def lake_scan(p, area="raw"):
    """(objects, {(device, id): count}, corrupt objects) over every lake
    object under <data>/lake/<area>; an object that does not decompress or
    parse is listed as corrupt."""
    root = p.data / "lake" / area
    counts, corrupt, objects = {}, [], 0
    if not root.exists():
        return 0, counts, corrupt
    for obj in sorted(x for x in root.rglob("*") if x.is_file()):
        objects += 1
        try:
            with gzip.open(obj, "rt") as f:
                for line in f:
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    k = (rec["device_id"], rec["measurement_id"])
                    counts[k] = counts.get(k, 0) + 1
        except Exception as e:  # noqa: BLE001
            corrupt.append(f"{obj}: {e!r}")
    return objects, counts, corrupt


def lake_objects_ok(p):
    """Every published object decompresses and parses (checked while serve
    runs: objects appear by atomic rename, so none may be half-written)."""
    _, _, corrupt = lake_scan(p)
    _, _, corrupt_q = lake_scan(p, "quarantine")
    return corrupt + corrupt_q


def verify(p, written, ok):
    """written / ok: {device: set(ids)}. serve must be stopped and the lake
    flushed. Returns the counts dict (the caller asserts)."""
    rows = db_rows(p)
    objects, lake, corrupt = lake_scan(p)
    n_written = sum(len(v) for v in written.values())
    n_ok = sum(len(v) for v in ok.values())
    unanswered = [(d, i) for d, ids in written.items() for i in ids if i not in ok[d]]
    ok_missing_db = [(d, i) for d, ids in ok.items() for i in ids if (d, i) not in rows]
    db_missing_lake = [k for k in rows if k not in lake]
    db_dup = [k for k, n in rows.items() if n != 1]
    lake_dup = [k for k, n in lake.items() if n != 1]
    mine = set(written)
    unexpected = [k for k in rows if k[0] in mine and k[1] not in written[k[0]]]
    lake_not_db = [k for k in lake if k not in rows]
    lost = set(unanswered) | set(ok_missing_db) | set(db_missing_lake)
    res = {
        "written": n_written,
        "ok": n_ok,
        "db_rows": sum(rows.values()),
        "lake_rows": sum(lake.values()),
        "lake_objects": objects,
        "lost": len(lost),
        "duplicated": len(set(db_dup) | set(lake_dup)),
        "unanswered": len(unanswered),
        "ok_not_in_db": len(ok_missing_db),
        "db_not_in_lake": len(db_missing_lake),
        "db_duplicated": len(db_dup),
        "lake_duplicated": len(lake_dup),
        "lake_not_in_db": len(lake_not_db),
        "unexpected_rows": len(unexpected),
        "lake_corrupt_objects": len(corrupt),
        "integrity": ",".join(integrity_check(p)),
    }
    detail = {
        "unanswered": unanswered[:5], "ok_not_in_db": ok_missing_db[:5],
        "db_not_in_lake": db_missing_lake[:5], "db_dup": db_dup[:5], "lake_dup": lake_dup[:5],
        "unexpected": unexpected[:5], "corrupt": corrupt[:5], "lake_not_db": lake_not_db[:5],
    }
    return res, detail


# --------------------------------------------------------------------------
# One run


class Run:
    """Workdir, platform, fleet, mounts: everything a soak run owns, all
    torn down by close() (also after a failure)."""

    def __init__(self, args, name):
        self.args = args
        self.name = name
        self.t0 = time.monotonic()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"fleetml-soak-{name}-", dir=args.tmp))
        self.mounts = Mounts()
        self.fillers = []
        self.p = None
        self.fleet = None
        self.probe = None
        self.failed = True
        log(f"[{name}] workdir {self.workdir}")

    def platform(self, data_tmpfs=None, fault=False, devices=(), extra_sets=None):
        self.p = Platform(self.args.bin, self.workdir, node_id=f"soak-{self.name}")
        if data_tmpfs:
            self.mounts.tmpfs(self.p.data, data_tmpfs)
        if fault:
            self.p.env["FM_FAULT_INJECTION"] = "1"
        # Fault runs push devices well past the per-device admission limits
        # (a rate-limited publish is refused, not lost, but it is not what
        # these runs measure): switch them off here.
        self.p.extra_sets.update({"pipeline.device_rate": "0", "pipeline.device_bytes_rate": "0"})
        if extra_sets:
            self.p.extra_sets.update(extra_sets)
        self.p.init()
        for d in devices:
            self.p.add_device(d)
        return self.p

    def start_fleet(self, ids, interval, timeout=2.0):
        self.fleet = Fleet(self.p, ids, self.workdir / "state", interval=interval,
                           timeout=timeout)
        self.fleet.start()
        return self.fleet

    def finish(self, extra):
        """Stops the load, drains the outboxes, stops serve, flushes the lake,
        verifies and prints the JSON line. Returns the counts."""
        self.fleet.stop()
        self.fleet.drain()
        written = {d: set(v) for d, v in self.fleet.written.items()}
        ok = {d: set(v) for d, v in self.fleet.ok.items()}
        if self.probe:
            self.probe.close()
            written[self.probe.device_id] = self.probe.written()
            ok[self.probe.device_id] = set(self.probe.ok)
            self.probe = None
        rc = self.p.stop(30)
        check(rc == 0, f"serve exited {rc} on SIGTERM\n{self.p.log_tail()}")
        r = self.p.cli("lake", "flush", timeout=120)
        check(r.returncode == 0, f"lake flush failed: {r.stderr}")
        res, detail = verify(self.p, written, ok)
        out = {"run": self.name, **extra, "devices": len(written), **res,
               "device_errors": len(self.fleet.errors),
               "device_timeouts_or_drops": len(self.fleet.other),
               "duration_s": round(time.monotonic() - self.t0, 1)}
        print(json.dumps(out), flush=True)
        problems = []
        for k in ("lost", "duplicated", "lake_not_in_db", "unexpected_rows",
                  "lake_corrupt_objects", "device_errors", "device_timeouts_or_drops"):
            if out[k] != 0:
                problems.append(f"{k}={out[k]}")
        if out["integrity"] != "ok":
            problems.append(f"integrity={out['integrity']}")
        if out["ok"] == 0:
            problems.append("no measurement was answered at all")
        check(not problems, f"[{self.name}] " + ", ".join(problems) +
              f"\ndetail: {json.dumps(detail, default=str)}"
              f"\nerrors: {self.fleet.errors[:5]} other: {self.fleet.other[:5]}")
        self.failed = False
        return out

    def close(self):
        if self.probe:
            try:
                self.probe.close()
            except Exception:  # noqa: BLE001
                pass
        if self.fleet:
            self.fleet.kill_all()
        for f in self.fillers:
            f.release()
        if self.p:
            self.p.cleanup()
        self.mounts.unmount_all()
        if self.failed or self.args.keep:
            log(f"[{self.name}] kept {self.workdir} (logs: serve-*.log, dev-*.out/err)")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def rand_sleep(lo, hi):
    time.sleep(random.uniform(lo, hi))


__all__ = [
    "Filler", "Fleet", "Probe", "Run", "SoakFailure", "WaitTimeout", "check", "db_rows",
    "http", "integrity_check", "lake_objects_ok", "lake_scan", "log", "metric", "pid_alive", "rand_sleep",
    "readyz", "serve_log_text", "statvfs_free", "wait_for",
]
