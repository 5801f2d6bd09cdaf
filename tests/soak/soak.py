#!/usr/bin/python3
"""fleetml soak runs: faults injected again and again under load.

    scripts/soak [all|kill-serve|kill-broker|disk-full|fsync|lake-unwritable ...]
                 [--cycles N] [--devices N] [--bin PATH] [--keep] [--seed S]

Each run prints one JSON line of counts and fails (exit status 1) unless
0 measurements were lost and 0 duplicated (database and lake). The runs
need root (tmpfs mounts) and a release build (`make build`). See
tests/soak/soaklib.py for what "written", "lost" and "duplicated" mean.

  kill-serve       kill -9 of `fleetml serve` at random moments (>= 20 cycles)
  kill-broker      kill -9 of the mosquitto child (>= 10 cycles)
  disk-full        the data directory's file system (a 64 MiB tmpfs) fills up
                   and is freed again
  fsync            injected fsync failures of the database (SQLite VFS shim,
                   POST /debug/fault with FM_FAULT_INJECTION=1)
  lake-unwritable  the lake directory (its own tmpfs) is full, then freed
"""

import argparse
import json
import os
import random
import signal
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from soaklib import (  # noqa: E402
    REPO, Filler, Probe, Run, check, db_rows, http, integrity_check, lake_objects_ok, lake_scan,
    log, metric, pid_alive, rand_sleep, readyz, serve_log_text, statvfs_free, wait_for,
)


def device_ids(prefix, n):
    return [f"{prefix}-{i:02d}" for i in range(1, n + 1)]


# --------------------------------------------------------------------------
# 1. kill -9 of serve


def run_kill_serve(args):
    cycles = args.cycles or 25
    run = Run(args, "kill-serve")
    try:
        ids = device_ids("soak-ks", args.devices)
        p = run.platform(devices=ids)
        p.start()
        fleet = run.start_fleet(ids, interval=args.interval)
        fleet.wait_progress(50, 60, "before the first kill")
        restarts = []
        for c in range(cycles):
            rand_sleep(0.2, 3.0)
            fleet.poll()
            p.kill9()
            t = time.monotonic()
            # Sometimes restart at once, sometimes let the devices pile up
            # retries against the orphaned broker for a while.
            rand_sleep(0.0, 1.5)
            p.start(timeout=60)
            restarts.append(time.monotonic() - t)
            fleet.wait_progress(20, 60, f"after restart {c + 1}")
            log(f"[kill-serve] cycle {c + 1}/{cycles}: ok so far {fleet.ok_count()}")
        fleet.wait_progress(50, 60, "after the last restart")
        return run.finish({"cycles": cycles,
                           "restart_s_max": round(max(restarts), 2)})
    finally:
        run.close()


# --------------------------------------------------------------------------
# 2. kill -9 of the broker child


def run_kill_broker(args):
    cycles = args.cycles or 12
    run = Run(args, "kill-broker")
    try:
        ids = device_ids("soak-kb", args.devices)
        p = run.platform(devices=ids)
        p.start()
        # Without FM_FAULT_INJECTION=1 the debug endpoint does not exist.
        for method in ("GET", "POST"):
            st, _ = http(p, "/debug/fault?fsync=1", method=method)
            check(st in (404, 405), f"{method} /debug/fault answered {st} without "
                  "FM_FAULT_INJECTION=1")
        fleet = run.start_fleet(ids, interval=args.interval)
        fleet.wait_progress(50, 60, "before the first kill")
        restarts_before = metric(p, "fleetml_broker_restarts_total") or 0
        for c in range(cycles):
            rand_sleep(0.2, 3.0)
            old = p.healthz()["broker_pid"]
            check(isinstance(old, int) and old > 0 and pid_alive(old), f"broker pid {old}")
            os.kill(old, signal.SIGKILL)

            def new_pid():
                pid = p.healthz().get("broker_pid")
                return pid if isinstance(pid, int) and pid > 0 and pid != old \
                    and pid_alive(pid) else None
            p.broker_pids.add(wait_for(new_pid, 60, interval=0.1, msg="a restarted broker"))
            p.wait_ready(60)
            fleet.wait_progress(20, 60, f"after broker restart {c + 1}")
            log(f"[kill-broker] cycle {c + 1}/{cycles}: ok so far {fleet.ok_count()}")
        restarts = (metric(p, "fleetml_broker_restarts_total") or 0) - restarts_before
        check(restarts >= cycles, f"fleetml_broker_restarts_total grew by {restarts}")
        fleet.wait_progress(50, 60, "after the last restart")
        return run.finish({"cycles": cycles, "broker_restarts": int(restarts)})
    finally:
        run.close()


# --------------------------------------------------------------------------
# 3. the data directory's file system fills up


def run_disk_full(args):
    cycles = args.cycles or 3
    run = Run(args, "disk-full")
    try:
        ids = device_ids("soak-df", max(2, args.devices // 2))
        probe_id = "soak-df-probe"
        p = run.platform(data_tmpfs="64m", devices=ids + [probe_id])
        p.start()
        # Device state (outboxes) lives outside the full file system: the
        # devices are not what is being tested here.
        fleet = run.start_fleet(ids, interval=max(args.interval, 0.02))
        run.probe = probe = Probe(p, probe_id)
        fleet.wait_progress(300, 60, "before filling")
        stats = {"cycles": cycles, "probe_unavailable": 0, "probe_ok_while_full": 0,
                 "readyz_200_while_full": 0, "readyz_503": 0, "recover_s_max": 0.0}
        for c in range(cycles):
            fails0 = metric(p, "fleetml_commit_failures_total")
            filler = Filler(p.data / f"filler-{c}")
            run.fillers.append(filler)
            filled = filler.fill()
            log(f"[disk-full] cycle {c + 1}: filled {filled >> 20} MiB, "
                f"free {statvfs_free(p.data)} bytes")
            # Until the first commit fails, measurements may still be stored
            # (pages the database already has); then the node must refuse.
            unavailable = []

            def refused():
                mid, st, code = probe.measure()
                if st == "error":
                    check(code == "unavailable", f"probe {mid}: error {code}, expected unavailable")
                    unavailable.append(mid)
                return unavailable
            wait_for(refused, 60, interval=0.05, msg="an `unavailable` reply")
            wait_for(lambda: readyz(p) == 503, 30, interval=0.1, msg="/readyz 503")
            stats["readyz_503"] += 1
            check(metric(p, "fleetml_store_unavailable") == 1, "fleetml_store_unavailable != 1")
            fails1 = metric(p, "fleetml_commit_failures_total")
            check(fails1 > fails0, f"fleetml_commit_failures_total {fails0} -> {fails1}")
            # Full and staying full: every answer is `unavailable` or a
            # durable `ok`. A full file system does not fail every write:
            # once a checkpoint has emptied the WAL, SQLite writes the next
            # frames over the WAL file's own pages from its start, which
            # need no new space, so a small commit (the store probe's) or a
            # few measurements can succeed and /readyz turn 200 until the
            # log needs to grow again. What must hold is that such an `ok`
            # is stored, and that nothing answered `unavailable` is.
            ok_while_full = []
            t_end = time.monotonic() + 6
            while time.monotonic() < t_end:
                mid, st, code = probe.measure()
                if st == "ok":
                    ok_while_full.append(mid)
                else:
                    check(code == "unavailable", f"probe {mid}: {st} {code}")
                    unavailable.append(mid)
                rz = readyz(p)
                check(rz in (200, 503), f"/readyz {rz} while the disk is full")
                stats["readyz_200_while_full"] += rz == 200
                time.sleep(0.1)
            stats["probe_unavailable"] += len(unavailable)
            stats["probe_ok_while_full"] += len(ok_while_full)
            rows = db_rows(p)
            stored = [m for m in unavailable if (probe_id, m) in rows]
            check(not stored, f"measurements answered `unavailable` are in the database: {stored[:5]}")
            missing = [m for m in ok_while_full if (probe_id, m) not in rows]
            check(not missing, f"measurements answered `ok` while full are not stored: {missing[:5]}")
            integ = integrity_check(p)
            check(integ == ["ok"], f"integrity_check while full: {integ}")
            corrupt = lake_objects_ok(p)
            check(not corrupt, f"corrupt lake objects while full: {corrupt[:3]}")
            # Free the space: the node recovers by itself -- every other
            # cycle with no device sending at all (readiness must come back
            # from the pipeline's own probe, not from traffic).
            idle = c % 2 == 1
            if idle:
                fleet.pause()
                time.sleep(1.5)
            t = time.monotonic()
            filler.release()
            wait_for(lambda: readyz(p) == 200, 60, interval=0.1,
                     msg="/readyz 200 again without a restart")
            if idle:
                stats["idle_recoveries"] = stats.get("idle_recoveries", 0) + 1
                fleet.resume()
            stats["recover_s_max"] = max(stats["recover_s_max"], round(time.monotonic() - t, 2))
            check(metric(p, "fleetml_store_unavailable") == 0, "fleetml_store_unavailable != 0")
            for mid in unavailable:          # the device retries with the same ids
                _, st, code = probe.measure(mid)
                check(st == "ok", f"retry of {mid} after recovery: {st} {code}")
            mid, st, code = probe.measure()
            check(st == "ok", f"new measurement after recovery: {st} {code}")
            fleet.wait_progress(50, 60, f"after recovery {c + 1}")
        logtext = serve_log_text(p)
        check("commit failed; replying unavailable" in logtext, "no commit failure in the logs")
        check("commits succeed again" in logtext or "store accepts commits again" in logtext,
              "no recovery in the logs")
        probe_recoveries = logtext.count("store accepts commits again")
        check(probe_recoveries >= stats.get("idle_recoveries", 0),
              f"idle recoveries {stats.get('idle_recoveries')} but {probe_recoveries} "
              "recoveries by the pipeline's store probe in the logs")
        stats["commit_failures"] = int(metric(p, "fleetml_commit_failures_total"))
        return run.finish(stats)
    finally:
        run.close()


# --------------------------------------------------------------------------
# 4. injected fsync failures (database)


def fault(p, n, file_n=0):
    q = f"fsync={n}" + (f"&file_fsync={file_n}" if file_n else "")
    st, body = http(p, f"/debug/fault?{q}", method="POST")
    check(st == 200, f"POST /debug/fault: {st} {body}")
    return json.loads(body)


def fault_pending(p):
    st, body = http(p, "/debug/fault")
    check(st == 200, f"GET /debug/fault: {st} {body}")
    return json.loads(body)["fsync_pending"]


def long_outage(p, probe, stats, n=12):
    """Many database fsyncs in a row fail (the fleet is paused): every
    measurement is refused, /readyz is 503 throughout, and when the
    failures stop, the store recovers by itself and the retries are stored
    once."""
    fault(p, n)
    failed = []
    while True:
        pending = fault_pending(p)
        if pending == 0:
            break
        mid, st, code = probe.measure()
        if pending >= 2:   # nothing else but the idle probe consumes failures now
            check(st == "error" and code == "unavailable",
                  f"long outage: {mid} got {st} {code} with {pending} failures pending")
            check(readyz(p) == 503, "/readyz not 503 during the outage")
        if st != "ok":
            failed.append(mid)
    rows = db_rows(p)
    check(not [m for m in failed if (probe.device_id, m) in rows],
          "measurements answered unavailable are stored")
    wait_for(lambda: readyz(p) == 200, 15, interval=0.1, msg="/readyz 200 after the outage")
    for m in failed:
        _, st, code = probe.measure(m)
        check(st == "ok", f"retry of {m} after the outage: {st} {code}")
    rows = db_rows(p)
    check(all(rows.get((probe.device_id, m)) == 1 for m in failed), "retries not stored once")
    stats["long_outage_unavailable"] = len(failed)
    stats["probe_unavailable"] += len(failed)
    stats["probe_retried_ok"] += len(failed)
    stats["injected"] += n


def pause_with_backlog(p, fleet):
    """Pauses the fleet at a moment when committed rows still wait for
    export (so the lake writer's next commit is the next database write).
    Returns False (fleet paused anyway) if no such moment came."""
    for _ in range(100):
        fleet.pause()
        if (metric(p, "fleetml_lake_backlog") or 0) > 0:
            return True
        fleet.resume()
        time.sleep(0.05)
    fleet.pause()
    return False


def crash_after_failed_fsync(run, p, fleet, probe, stats, n):
    """A commit whose fsync failed, then kill -9 before anything else is
    committed. The failed transaction's frames may still be in the WAL and
    be recovered at the next start: then a measurement answered
    `unavailable` turns out stored. That is allowed ("retry" does not
    promise "not stored"); what must hold is that the retry (same id) gets
    ok and the row exists exactly once, in the database and in the lake."""
    recovered = lake_crashes = 0
    for i in range(n):
        fleet.pause()
        wait_for(lambda: metric(p, "fleetml_lake_backlog") == 0, 30, interval=0.1,
                 msg="lake backlog 0")
        time.sleep(0.3)
        fault(p, 1)
        mid, st, code = probe.measure()
        check(st == "error" and code == "unavailable", f"{mid}: {st} {code}")
        p.kill9()
        p.start(timeout=60)
        if (probe.device_id, mid) in db_rows(p):
            recovered += 1
        _, st, code = probe.measure(mid, timeout=10, attempts=6)
        check(st == "ok", f"retry of {mid} after the crash: {st} {code}")
        check(db_rows(p).get((probe.device_id, mid)) == 1, f"{mid} not stored exactly once")
        fleet.resume()
        fleet.wait_progress(30, 60, f"after crash {i + 1}")
        # The same for the lake writer: its cursor commit fails (it then
        # deletes its spool files), and serve dies before anything else is
        # committed. If recovery resurrects that cursor commit, the writer
        # must notice the object is missing and export those rows again.
        pause_with_backlog(p, fleet)
        fault(p, 1)
        wait_for(lambda: fault_pending(p) == 0, 30, interval=0.05,
                 msg="the lake writer's commit to fail")
        p.kill9()
        p.start(timeout=60)
        lake_crashes += 1
        wait_for(lambda: metric(p, "fleetml_lake_backlog") == 0, 60, interval=0.1,
                 msg="lake backlog 0 after the crash")
        fleet.resume()
        fleet.wait_progress(30, 60, f"after lake crash {i + 1}")
    stats["crash_after_failed_fsync"] = n
    stats["unavailable_but_stored_after_crash"] = recovered
    stats["crash_after_failed_lake_commit"] = lake_crashes


def run_fsync(args):
    cycles = args.cycles or 15
    run = Run(args, "fsync")
    try:
        ids = device_ids("soak-fs", args.devices)
        probe_id = "soak-fs-probe"
        p = run.platform(fault=True, devices=ids + [probe_id])
        p.start()
        # The endpoint exists only with FM_FAULT_INJECTION=1.
        fleet = run.start_fleet(ids, interval=args.interval)
        run.probe = probe = Probe(p, probe_id)
        fleet.wait_progress(50, 60, "before the first fault")
        stats = {"cycles": cycles, "injected": 0, "probe_unavailable": 0,
                 "probe_retried_ok": 0, "loaded_cycles": cycles, "lake_commit_faults": 0}
        fails0 = metric(p, "fleetml_commit_failures_total")
        for c in range(cycles):
            # (a) Isolated: the fleet is paused and the lake has caught up, so
            # the probe's batch is the one whose fsync fails.
            fleet.pause()
            wait_for(lambda: metric(p, "fleetml_lake_backlog") == 0, 30, interval=0.1,
                     msg="lake backlog 0")
            time.sleep(0.3)
            n = random.randint(1, 3)
            fault(p, n)
            stats["injected"] += n
            res = probe.burst(random.randint(1, 4))
            first_mid, first_st, first_code = res[0]
            check(first_st == "error" and first_code == "unavailable",
                  f"cycle {c + 1}: first measurement after fsync failure got {first_st} "
                  f"{first_code}")
            failed = [m for m, st, code in res if st != "ok"]
            for m, st, code in res:
                check(st == "ok" or code == "unavailable", f"{m}: {st} {code}")
            rows = db_rows(p)
            stored = [m for m in failed if (probe_id, m) in rows]
            check(not stored, f"cycle {c + 1}: ids answered unavailable are stored: {stored}")
            okd = [m for m, st, _ in res if st == "ok"]
            check(all((probe_id, m) in rows for m in okd), "ok but not stored")
            wait_for(lambda: fault_pending(p) == 0, 30, interval=0.1,
                     msg="injected failures consumed")
            # After the failures stop, everything is ok again; the retries
            # (same ids) are stored exactly once.
            for m in failed:
                _, st, code = probe.measure(m)
                check(st == "ok", f"cycle {c + 1}: retry of {m}: {st} {code}")
            stats["probe_unavailable"] += len(failed)
            stats["probe_retried_ok"] += len(failed)
            rows = db_rows(p)
            check(all(rows.get((probe_id, m)) == 1 for m in failed), "retries not stored once")
            check(readyz(p) == 200, "/readyz not 200 after a successful commit")
            if c == 0:
                long_outage(p, probe, stats)
            fleet.resume()
            fleet.wait_progress(30, 60, f"after isolated fault {c + 1}")
            # (b) Under load: fsyncs fail in the middle of the fleet's stream
            # (the pipeline's and the lake writer's commits); every other
            # cycle also fsyncs of files (lake spool files, fm_fsync_fd).
            fault(p, random.randint(1, 5), random.randint(1, 3) if c % 2 else 0)
            wait_for(lambda: fault_pending(p) == 0, 30, interval=0.1,
                     msg="injected failures consumed under load")
            fleet.wait_progress(30, 60, f"after loaded fault {c + 1}")
            # (c) The lake writer's commit fails: with the fleet paused and
            # rows still to export, the only database writer left is the
            # lake writer (cursor commits); it must not publish twice.
            if pause_with_backlog(p, fleet):
                fault(p, random.randint(1, 2))
                wait_for(lambda: fault_pending(p) == 0, 30, interval=0.1,
                         msg="the lake writer's commit to fail")
                stats["lake_commit_faults"] += 1
            wait_for(lambda: metric(p, "fleetml_lake_backlog") == 0, 60, interval=0.1,
                     msg="lake backlog 0 after a failed lake commit")
            fleet.resume()
            log(f"[fsync] cycle {c + 1}/{cycles}: ok so far {fleet.ok_count()}")
        fails = metric(p, "fleetml_commit_failures_total") - fails0
        check(fails >= cycles, f"fleetml_commit_failures_total grew by {fails} only")
        stats["commit_failures"] = int(fails)
        st, body = http(p, "/debug/fault")
        stats["injected_total"] = json.loads(body)["fsync_injected"]
        crash_after_failed_fsync(run, p, fleet, probe, stats, max(2, cycles // 5))
        return run.finish(stats)
    finally:
        run.close()


# --------------------------------------------------------------------------
# 5. the lake directory becomes unwritable


def run_lake_unwritable(args):
    cycles = args.cycles or 3
    run = Run(args, "lake-unwritable")
    try:
        ids = device_ids("soak-lu", args.devices)
        p = run.platform(devices=ids)
        lake = p.data / "lake"
        run.mounts.tmpfs_over(lake, "64m")
        p.start()
        fleet = run.start_fleet(ids, interval=args.interval)
        fleet.wait_progress(50, 60, "before filling the lake")
        stats = {"cycles": cycles, "backlog_max": 0, "ok_while_unwritable": 0,
                 "drain_s_max": 0.0}
        for c in range(cycles):
            filler = Filler(lake / f"filler-{c}")
            run.fillers.append(filler)
            filler.fill()
            log(f"[lake-unwritable] cycle {c + 1}: lake full")
            ok0 = fleet.ok_count()
            backlogs = []
            t_end = time.monotonic() + 12
            while time.monotonic() < t_end:
                b = metric(p, "fleetml_lake_backlog")
                backlogs.append(b)
                check(readyz(p) == 200, "/readyz not 200 while only the lake is full")
                time.sleep(0.5)
            fleet.poll()
            gained = fleet.ok_count() - ok0
            stats["ok_while_unwritable"] += gained
            stats["backlog_max"] = max(stats["backlog_max"], int(max(backlogs)))
            check(gained > 100, f"only {gained} measurements answered while the lake was full")
            check(backlogs[-1] > backlogs[0] and backlogs[-1] > 200,
                  f"fleetml_lake_backlog did not grow: {backlogs}")
            corrupt = lake_objects_ok(p)
            check(not corrupt, f"corrupt lake objects: {corrupt[:3]}")
            filler.release()
            t = time.monotonic()
            if c == cycles - 1:
                fleet.stop()   # the last cycle: drain to exactly 0
            wait_for(lambda: metric(p, "fleetml_lake_backlog") < (1 if c == cycles - 1 else 200),
                     120, interval=0.2, msg="the lake backlog to drain")
            stats["drain_s_max"] = max(stats["drain_s_max"], round(time.monotonic() - t, 2))
            log(f"[lake-unwritable] cycle {c + 1}: backlog drained in "
                f"{time.monotonic() - t:.1f}s (max {int(max(backlogs))})")
        # Backlog 0 while serve still runs: everything stored is in the lake
        # before the final flush (checked again by the verification).
        rows = db_rows(p)
        _, lk, _ = lake_scan(p)
        missing = [k for k in rows if k not in lk]
        check(not missing, f"backlog 0 but {len(missing)} rows not in the lake: {missing[:3]}")
        stats["lake_complete_before_flush"] = True
        return run.finish(stats)
    finally:
        run.close()


RUNS = {
    "kill-serve": run_kill_serve,
    "kill-broker": run_kill_broker,
    "disk-full": run_disk_full,
    "fsync": run_fsync,
    "lake-unwritable": run_lake_unwritable,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", default=["all"],
                    help="all (default) or any of: " + ", ".join(RUNS))
    ap.add_argument("--bin", default=str(REPO / "build" / "fleetml"))
    ap.add_argument("--cycles", type=int, default=0, help="fault cycles (default per run)")
    ap.add_argument("--devices", type=int, default=6, help="device run processes")
    ap.add_argument("--interval", type=float, default=0.01,
                    help="seconds between measurements per device")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--keep", action="store_true", help="keep work directories")
    args = ap.parse_args()
    args.bin = os.path.abspath(args.bin)
    names = list(RUNS) if args.runs == ["all"] else args.runs
    for n in names:
        if n not in RUNS:
            ap.error(f"unknown run {n!r}")
    if not os.access(args.bin, os.X_OK):
        ap.error(f"no fleetml binary at {args.bin} (make build)")
    if os.geteuid() != 0:
        ap.error("soak runs mount tmpfs file systems: run as root")
    # SIGTERM/SIGHUP unwind like Ctrl-C: every run's finally block stops
    # its processes and unmounts its file systems.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, f: sys.exit(128 + s))
    seed = args.seed if args.seed is not None else int(time.time())
    random.seed(seed)
    log(f"soak: runs {names}, seed {seed}, binary {args.bin}")
    failed = []
    for n in names:
        if args.cycles and n == "kill-serve" and args.cycles < 20:
            log("note: kill-serve is specified for >= 20 cycles")
        try:
            RUNS[n](args)
        except Exception as e:  # noqa: BLE001 - report and go on with the next run
            failed.append(n)
            print(json.dumps({"run": n, "failed": True, "error": str(e)[:2000]}), flush=True)
            traceback.print_exc()
    if failed:
        log(f"soak: FAILED: {failed}")
        return 1
    log("soak: all runs passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
