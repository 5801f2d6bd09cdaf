#!/usr/bin/python3
"""`make bench`: fleetml against its baseline, and many devices on one node.

Runs, with the same load generator (`fleetml sim`) and mutual TLS everywhere:
  (a) baseline: mosquitto (same generated config and auth plugin) + fleetml-echo,
      a service that answers each measurement with its id and does nothing else;
  (b) `fleetml serve`: validation, dedupe, features, XGBoost, group commit, lake.
Each gets a closed-loop run (N devices x W in flight) and an open-loop run at half
of (b)'s closed-loop throughput. Then 10,000 devices connect to (b) over mTLS and
send one measurement every 10 s each.

Then the HTTP API: sign-in, a page of measurements, predict (not stored) and predict
with ?store=true, each from several concurrent clients. Then a cluster: 1 node against 3
nodes on one PostgreSQL behind HAProxy, closed loop through HAProxy.

Prints one JSON document (and writes it to bench/last.json when --out is given).
"""
import argparse
import http.client
import json
import statistics
import threading
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def proc_cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_mem_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def http_json(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return json.loads(r.read())
    except Exception:
        return None


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


SERVICE_TRANSPORT = os.environ.get("FM_BENCH_SERVICE_TRANSPORT", "unix")


class Node:
    """A data directory with init done and N devices registered."""

    def __init__(self, build, devices, prefix="bench", admission=False):
        self.bin = os.path.join(build, "fleetml")
        self.echo = os.path.join(build, "fleetml-echo")
        self.dir = tempfile.mkdtemp(prefix="fleetml-bench-")
        self.ports = dict(mqtt=free_port(), svc=free_port(), http=free_port(), ops=free_port())
        self.run([self.bin, "init", "--data", self.dir,
                  "--set", "broker.bind=127.0.0.1",
                  "--set", f"broker.port={self.ports['mqtt']}",
                  "--set", f"broker.service_port={self.ports['svc']}",
                  "--set", f"http.port={self.ports['http']}",
                  "--set", f"ops.port={self.ports['ops']}",
                  "--set", "node.log_level=warn",
                  # Admission off unless measured: the load generators are
                  # few devices sending fast.
                  *([] if admission else ["--set", "pipeline.device_rate=0",
                                          "--set", "pipeline.device_bytes_rate=0"]),
                  # How fleetml and both echoes reach the broker: the same
                  # for all three (unix socket, the default, or mTLS).
                  "--set", f"broker.service_transport={SERVICE_TRANSPORT}"])
        self.devices = [f"{prefix}-{i:04d}" for i in range(1, devices + 1)]
        for d in self.devices:
            self.run([self.bin, "device", "add", d, "--data", self.dir])
        self.procs = []

    def run(self, argv):
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def spawn(self, argv, log):
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(self.dir, log), "ab"))
        self.procs.append(p)
        return p

    def start_serve(self, env=None):
        p = self.spawn([self.bin, "serve", "--data", self.dir], "serve.log")
        wait_for(lambda: (http_json(self.ports["ops"], "/readyz") or {}).get("ready"), 60,
                 "fleetml serve to be ready")
        broker = http_json(self.ports["ops"], "/healthz")["broker_pid"]
        return p, broker

    def start_baseline(self, broker=None, durable=False):
        # The broker config, its certificate copies and the registry snapshot
        # are what `fleetml serve` generates; take them from one short run.
        if broker is None:
            serve, _ = self.start_serve()
            self.stop(serve)
            self.procs.remove(serve)
            conf = os.path.join(self.dir, "broker", "mosquitto.conf")
            broker = self.spawn(["/usr/sbin/mosquitto", "-c", conf], "baseline-broker.log")
        argv = [self.echo, "--data", self.dir]
        if durable:
            argv += ["--durable", os.path.join(self.dir, "durable-echo.log")]
        echo = self.spawn(argv, "echo.log")
        # Ready when one device gets an answer.
        wait_for(lambda: self.sim(1, inflight=1, duration=1, quiet=True)["ok"] > 0, 60,
                 "the baseline to answer")
        return broker, echo

    def sim(self, devices, inflight=None, rate=None, duration=10, quiet=False, prefix="bench",
            extra=()):
        argv = [self.bin, "sim", "--data", self.dir, "--devices", str(devices), "--prefix", prefix,
                "--duration", str(duration), "--json", "--drain", "10", "--payload-pool", "64"]
        argv += ["--inflight", str(inflight)] if inflight else ["--rate", str(rate)]
        argv += list(extra)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(argv, check=False, capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
        if not lines:
            raise RuntimeError(f"sim failed: {out.stderr[-2000:]}")
        res = json.loads(lines[-1])
        res["sim_cpu_s"] = round((after.ru_utime + after.ru_stime) -
                                 (before.ru_utime + before.ru_stime), 3)
        return res

    def stop(self, p, sig=signal.SIGTERM):
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def close(self):
        for p in reversed(self.procs):
            self.stop(p)
        shutil.rmtree(self.dir, ignore_errors=True)


def measured(node, pids, fn):
    """Runs fn() and reports CPU seconds and memory of the given processes."""
    cpu0 = {k: proc_cpu_s(p) for k, p in pids.items()}
    res = fn()
    dur = res["duration_s"]
    res["processes"] = {
        k: {"cpu_s": round(proc_cpu_s(p) - cpu0[k], 3),
            "cpu_pct": round(100 * (proc_cpu_s(p) - cpu0[k]) / dur, 1),
            "rss_mb": round(proc_mem_kb(p, "VmRSS") / 1024, 1),
            "peak_rss_mb": round(proc_mem_kb(p, "VmHWM") / 1024, 1)}
        for k, p in pids.items()}
    sim_cpu = res.pop("sim_cpu_s")
    res["processes"]["sim"] = {"cpu_s": sim_cpu, "cpu_pct": round(100 * sim_cpu / dur, 1)}
    return res


def summary(res):
    return {"throughput_per_s": res["throughput_per_s"], "latency_ms": res["latency_ms"],
            "ok": res["ok"], "errors": res["errors"], "timeouts": res["timeouts"],
            "duration_s": res["duration_s"], "processes": res["processes"]}


def bench_pair(args):
    node = Node(args.build, args.devices)
    out = {"devices": args.devices, "inflight": args.inflight, "duration_s": args.duration}
    try:
        serve, broker = node.start_serve()
        m0 = metrics(node.ports["ops"])
        closed_b = measured(node, {"fleetml": serve.pid, "mosquitto": broker},
                            lambda: node.sim(args.devices, inflight=args.inflight,
                                             duration=args.duration))
        m1 = metrics(node.ports["ops"])
        n = m1["fleetml_commit_batch_size_count"] - m0["fleetml_commit_batch_size_count"]
        s = m1["fleetml_commit_batch_size_sum"] - m0["fleetml_commit_batch_size_sum"]
        closed_b["commit_batch_mean"] = round(s / n, 2) if n else None
        half = closed_b["throughput_per_s"] / 2
        rate = half / args.devices
        open_b = measured(node, {"fleetml": serve.pid, "mosquitto": broker},
                          lambda: node.sim(args.devices, rate=rate, duration=args.duration))
        node.stop(serve)
        node.procs.remove(serve)

        broker_a, echo = node.start_baseline()
        closed_a = measured(node, {"echo": echo.pid, "mosquitto": broker_a.pid},
                            lambda: node.sim(args.devices, inflight=args.inflight,
                                             duration=args.duration))
        open_a = measured(node, {"echo": echo.pid, "mosquitto": broker_a.pid},
                          lambda: node.sim(args.devices, rate=rate, duration=args.duration))
        out["baseline"] = {"closed_loop": summary(closed_a), "open_loop": summary(open_a)}
        out["fleetml"] = {"closed_loop": summary(closed_b), "open_loop": summary(open_b)}
        out["fleetml"]["closed_loop"]["commit_batch_mean"] = closed_b["commit_batch_mean"]
        out["open_loop_rate_per_s"] = round(half, 1)
        ratio = closed_b["throughput_per_s"] / closed_a["throughput_per_s"]
        out["ratio"] = round(ratio, 3)
        p99 = open_b["latency_ms"]["p99"]
        out["targets"] = {"ratio_min": 0.8, "ratio_met": ratio >= 0.8,
                          "open_loop_p99_ms_max": 3.0, "open_loop_p99_met": p99 <= 3.0}
    finally:
        node.close()
    return out


def percentiles_ms(lat):
    lat = sorted(lat)
    q = lambda f: round(1000 * lat[min(len(lat) - 1, int(f * len(lat)))], 3)
    return {"p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": round(1000 * lat[-1], 3),
            "n": len(lat)}


def fsync_probe(directory, n=2000):
    """The disk's own tail: n x (append 4 KiB + fdatasync), like a commit."""
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    buf, lat = b"x" * 4096, []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            os.write(fd, buf)
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)
    return percentiles_ms(lat)


def stage_summary(m0, m1):
    """Mean per stage over a run, and the slowest observation since start."""
    out = {}
    names = {"queue": "fleetml_stage_seconds{stage=\"queue\"}",
             "prepare": "fleetml_stage_seconds{stage=\"prepare\"}",
             "handoff": "fleetml_stage_seconds{stage=\"handoff\"}",
             "admit": "fleetml_stage_seconds{stage=\"admit\"}",
             "inference": "fleetml_inference_seconds",
             "commit": "fleetml_commit_seconds",
             "publish": "fleetml_stage_seconds{stage=\"publish\"}",
             "reply": "fleetml_reply_seconds"}
    for k, base in names.items():
        if base.endswith("}"):
            cnt, sm = base.replace("{", "_count{"), base.replace("{", "_sum{")
        else:
            cnt, sm = base + "_count", base + "_sum"
        n = m1.get(cnt, 0) - m0.get(cnt, 0)
        s = m1.get(sm, 0) - m0.get(sm, 0)
        out[k] = {"count": int(n), "mean_ms": round(1000 * s / n, 3) if n else None,
                  "slowest_ms": round(1000 * m1.get(f'fleetml_slowest_seconds{{of="{k}"}}', 0), 3)}
    # SQLite's log: who checkpointed it during the run ("bound": a commit
    # waited for one) and how often it restarted.
    out["wal"] = {by: int(m1.get(f'fleetml_wal_checkpoints_total{{by="{by}"}}', 0) -
                          m0.get(f'fleetml_wal_checkpoints_total{{by="{by}"}}', 0))
                  for by in ("checkpointer", "idle", "bound")}
    out["wal"]["restarts"] = int(m1.get("fleetml_wal_restarts_total", 0) -
                                 m0.get("fleetml_wal_restarts_total", 0))
    return out


def latency_runs(node, pids, closed_rate_hint, args, http_port=None):
    """Closed loop, then open loop at 10/s, 500/s, 1000/s (20 devices) and at
    half of closed_rate_hint (or of this system's own closed loop)."""
    res = {}
    closed = measured(node, pids, lambda: node.sim(args.devices, inflight=args.inflight,
                                                   duration=args.duration))
    res["closed_loop"] = summary(closed)
    half = (closed_rate_hint or closed["throughput_per_s"]) / 2
    plan = [("10", 20, 10.0), ("500", 20, 500.0), ("1000", 20, 1000.0),
            ("half_max", args.devices, half)]
    for name, devices, total in plan:
        m0 = metrics(http_port) if http_port else None
        r = measured(node, pids, lambda: node.sim(devices, rate=total / devices,
                                                  duration=args.latency_duration))
        res[f"open_{name}"] = dict(summary(r), rate_per_s=round(total, 1), devices=devices)
        if http_port:
            res[f"open_{name}"]["stages"] = stage_summary(m0, metrics(http_port))
    return res


def bench_latency(args):
    """The reply path against the broker's speed and the disk's: fleetml, the
    do-nothing echo and the durable echo, same broker, mTLS and load."""
    node = Node(args.build, args.devices)
    out = {"devices": args.devices, "inflight": args.inflight,
           "closed_duration_s": args.duration, "open_duration_s": args.latency_duration,
           "service_transport": SERVICE_TRANSPORT}
    try:
        out["disk_fsync_ms"] = fsync_probe(node.dir)
        serve, broker = node.start_serve()
        out["fleetml"] = latency_runs(node, {"fleetml": serve.pid, "mosquitto": broker}, None,
                                      args, node.ports["ops"])
        fl_max = out["fleetml"]["closed_loop"]["throughput_per_s"]
        node.stop(serve)
        node.procs.remove(serve)
        broker_a, echo = node.start_baseline()
        out["echo"] = latency_runs(node, {"echo": echo.pid, "mosquitto": broker_a.pid}, fl_max,
                                   args)
        node.stop(echo)
        node.procs.remove(echo)
        _, decho = node.start_baseline(broker=broker_a, durable=True)
        out["durable_echo"] = latency_runs(node, {"echo": decho.pid,
                                                  "mosquitto": broker_a.pid}, fl_max, args)
        out["disk_fsync_ms_after"] = fsync_probe(node.dir)
    finally:
        node.close()
    out["targets"] = latency_targets(out)
    return out


def latency_targets(out):
    fl, echo, dur = out["fleetml"], out["echo"], out["durable_echo"]
    t = {"no_stalls": {}}
    for run in ("open_half_max", "open_500", "open_1000"):
        lat = fl[run]["latency_ms"]
        t["no_stalls"][run] = {
            "fleetml": {k: lat[k] for k in ("p50", "p99", "p999", "max")},
            "durable_echo": {k: dur[run]["latency_ms"][k] for k in ("p50", "p99", "p999", "max")},
            "p99_max_ms": 3.0, "p999_max_ms": 10.0, "max_ms": 50.0,
            "met": lat["p99"] <= 3.0 and lat["p999"] <= 10.0 and lat["max"] <= 50.0,
            "answered_all": fl[run]["errors"] == 0 and fl[run]["timeouts"] == 0}
    p50 = fl["open_10"]["latency_ms"]["p50"]
    e50 = echo["open_10"]["latency_ms"]["p50"]
    t["no_fixed_waits"] = {"fleetml_p50_ms": p50, "echo_p50_ms": e50,
                           "durable_echo_p50_ms": dur["open_10"]["latency_ms"]["p50"],
                           "max_gap_ms": 1.0, "met": p50 - e50 <= 1.0}
    ratio = fl["closed_loop"]["throughput_per_s"] / echo["closed_loop"]["throughput_per_s"]
    t["throughput"] = {"fleetml_per_s": fl["closed_loop"]["throughput_per_s"],
                       "echo_per_s": echo["closed_loop"]["throughput_per_s"],
                       "ratio": round(ratio, 3), "ratio_min": 0.8, "met": ratio >= 0.8}
    return t


def _mqtt_varint(n):
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_str(text):
    b = text.encode()
    return len(b).to_bytes(2, "big") + b


def flood(node, device, count, size, stats):
    """One device writing count PUBLISHes (QoS 0) of size bytes as fast as
    its TLS connection takes them: a raw MQTT 3.1.1 client, so nothing on
    this side paces it."""
    ddir = os.path.join(node.dir, "devices", device)
    ctx = ssl.create_default_context(cafile=os.path.join(node.dir, "pki", "ca.crt"))
    ctx.load_cert_chain(os.path.join(ddir, "device.crt"), os.path.join(ddir, "device.key"))
    raw = socket.create_connection(("127.0.0.1", node.ports["mqtt"]), timeout=30)
    s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + _mqtt_str(device)
    s.sendall(b"\x10" + _mqtt_varint(len(body)) + body)
    ack = s.recv(4)
    if ack[:1] != b"\x20" or ack[3:4] != b"\x00":
        raise RuntimeError(f"flood device refused: {ack!r}")
    topic = _mqtt_str(f"fleet/{device}/measurements")
    t0 = time.monotonic()
    try:
        for i in range(count):
            head = b'{"id":"flood-%d","pad":"' % i
            payload = head + b"a" * (size - len(head) - 2) + b'"}'
            pkt = topic + payload
            s.sendall(b"\x30" + _mqtt_varint(len(pkt)) + pkt)
            stats["sent"] = i + 1
    except OSError as e:
        stats["ended_by"] = str(e)
    stats["seconds"] = round(time.monotonic() - t0, 2)
    s.close()


def bench_flood(args):
    """A well-behaved device's replies while another device floods the
    broker with 1,500 large payloads (the admission limits at their
    defaults): the flood must be refused at the broker, not queued ahead
    of the good device's measurements. Target: no reply slower than 100 ms."""
    node = Node(args.build, 2, admission=True)
    good, evil = node.devices
    out = {"flood_messages": 1500, "flood_bytes_each": 131000}
    try:
        serve, broker = node.start_serve()
        node.sim(1, rate=1, duration=2, quiet=True)  # warm: the good device connects
        before = metrics(node.ports["ops"])
        stats = {}
        res = {}
        # The good device sends 10 measurements a second (under its rate)
        # for the whole window; the flood starts 2 s in.
        t = threading.Thread(target=lambda: res.update(
            node.sim(1, rate=10, duration=args.flood_duration)))
        t.start()
        time.sleep(2)
        flood(node, evil, 1500, 131000, stats)
        t.join()
        after = metrics(node.ports["ops"])
        out["flood"] = stats
        out["refused_messages"] = int(after.get("fleetml_broker_refused_messages_total", 0) -
                                      before.get("fleetml_broker_refused_messages_total", 0))
        out["quarantined"] = int(
            sum(v for k, v in after.items() if k.startswith("fleetml_measurements_rejected_total"))
            - sum(v for k, v in before.items()
                  if k.startswith("fleetml_measurements_rejected_total")))
        out["good_device"] = {k: res.get(k) for k in ("ok", "errors", "timeouts", "latency_ms")}
        lat = out["good_device"]["latency_ms"]
        out["targets"] = {"max_ms": 100.0, "good_max_ms": lat["max"],
                          "met": lat["max"] <= 100.0 and res.get("errors", 1) == 0 and
                          res.get("timeouts", 1) == 0}
    finally:
        node.close()
    return out


def pipeline_run(args, *sets, extra=()):
    cmd = [os.path.join(args.build, "fleetml"), "bench", "pipeline", "--n", "20000"]
    for s in sets:
        cmd += ["--set", s]
    cmd += list(extra)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads([l for l in out.stdout.splitlines() if l.startswith("{")][-1])


def bench_pipeline_cpu(args):
    # Then 200 lone measurements: the service's own share of a quiet
    # fleet's reply time (no broker, no network; the store's disk included).
    res = pipeline_run(args, extra=("--lone", "200"))
    res["targets"] = {"cpu_us_max": 25.0, "cpu_met": res["cpu_us_per_measurement"] <= 25.0,
                      "parse_validate_us_max": 5.0,
                      "parse_validate_met": res["parse_validate_us"] <= 5.0}
    return res


def bench_pipeline_postgres(args):
    """The same in-process pipeline on a throwaway PostgreSQL on this machine
    (the figure next to SQLite's; no target of its own)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                    "integration"))
    from pgserver import PgServer
    pg = PgServer(dbname="benchpipe").start()
    try:
        return pipeline_run(args, f"store.url={pg.url}")
    finally:
        pg.stop()


def bench_functions(args):
    """Warm calls and cold starts of the example functions (C and Python),
    sandbox included: what a function adds to a delivery, next to AWS
    Lambda's 200-400 ms Python cold starts."""
    import shutil
    import tempfile
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ex = os.path.join(root, "examples", "functions")
    out = {}
    with tempfile.TemporaryDirectory() as d:
        shutil.copytree(os.path.join(ex, "python-ward-note"), os.path.join(d, "ward-note"))
        shutil.copytree(os.path.join(ex, "c-range-check"), os.path.join(d, "range-check"))
        shutil.copy(os.path.join(args.build, "range_check"), os.path.join(d, "range-check"))
        for name in ("range-check", "ward-note"):
            r = subprocess.run([os.path.join(args.build, "fleetml"), "bench", "function",
                                os.path.join(d, name), "--n", "20000", "--starts", "20"],
                               capture_output=True, text=True, check=True)
            res = json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])
            res["targets"] = {"warm_p99_us_max": 2000,
                              "warm_p99_met": res["warm_us"]["p99"] <= 2000}
            out[name] = res
    return out


def bench_processor(args):
    """What a processor function adds to a device's reply: the same node,
    the same open-loop load, once from devices the model answers and once
    from devices of a group the Krieger example processor answers."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    node = Node(args.build, 20)
    out = {"devices": 20, "rate_per_s": 200, "duration_s": args.duration}  # 10/s each
    try:
        for i in range(1, 21):
            node.run([node.bin, "device", "add", f"proc-{i:04d}", "--group", "research",
                      "--data", node.dir])
        shutil.copytree(os.path.join(root, "examples", "functions", "python-krieger-processor"),
                        os.path.join(node.dir, "functions", "krieger"))
        node.start_serve()
        node.sim(20, rate=10, duration=3, quiet=True, prefix="proc")  # warm the path
        out["model"] = node.sim(20, rate=10, duration=args.duration, prefix="bench")
        out["processor"] = node.sim(20, rate=10, duration=args.duration, prefix="proc")
    finally:
        node.close()
    m, f = out["model"]["latency_ms"], out["processor"]["latency_ms"]
    out["added_ms"] = {k: round(f[k] - m[k], 3) for k in ("p50", "p99", "p999")}
    out["targets"] = {"added_p99_ms_max": 2.0,
                      "added_p99_met": out["added_ms"]["p99"] <= 2.0,
                      "processor_errors": out["processor"].get("errors", 0)}
    return out


def bench_many(args):
    """N devices connected at once, one measurement every 10 s each."""
    node = Node(args.build, 0)
    per_proc = 4000  # each simulated device holds 3 descriptors; stay under ulimit -n
    out = {"devices": args.many}
    try:
        # Register the devices directly in bulk: issuing 10,000 certificates
        # through the CLI one process at a time would take minutes.
        procs = []
        n_procs = (args.many + per_proc - 1) // per_proc
        prefixes = [f"m{i}" for i in range(n_procs)]
        counts = [min(per_proc, args.many - i * per_proc) for i in range(n_procs)]
        for pre, cnt in zip(prefixes, counts):
            subprocess.run([node.bin, "sim", "--data", node.dir, "--devices", str(cnt),
                            "--prefix", pre, "--provision", "--duration", "0.001", "--rate",
                            "0.001", "--json", "--drain", "0"],
                           check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        serve, broker = node.start_serve()
        rss0 = {"fleetml": proc_mem_kb(serve.pid, "VmRSS"), "mosquitto": proc_mem_kb(broker, "VmRSS")}
        for pre, cnt in zip(prefixes, counts):
            # The fleet's TLS handshakes are spread over the ramp so they do not
            # starve the broker and the platform on a small machine.
            procs.append(subprocess.Popen(
                [node.bin, "sim", "--data", node.dir, "--devices", str(cnt), "--prefix", pre,
                 "--rate", "0.1", "--duration", str(args.many_duration), "--json", "--drain", "15",
                 "--payload-pool", "16", "--connect-rate",
                 str(max(1.0, args.connect_rate * cnt / args.many))],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        # Memory per connected device: the peak while the fleet is connected,
        # minus the idle footprint measured before the first connection.
        results = []
        peak = {"fleetml": 0, "mosquitto": 0}
        while any(p.poll() is None for p in procs):
            peak["fleetml"] = max(peak["fleetml"], proc_mem_kb(serve.pid, "VmRSS"))
            peak["mosquitto"] = max(peak["mosquitto"], proc_mem_kb(broker, "VmRSS"))
            time.sleep(0.5)
        for p in procs:
            lines = [l for l in p.stdout.read().splitlines() if l.startswith("{")]
            results.append(json.loads(lines[-1]) if lines else {})
        total = lambda k: sum(r.get(k, 0) for r in results)
        connect_s = max((r.get("all_connected_s", -1) for r in results), default=-1)
        out.update({
            "connected": total("connected"), "sent": total("sent"), "ok": total("ok"),
            "errors": total("errors"), "timeouts": total("timeouts"), "pending": total("pending"),
            "all_connected_s": connect_s,
            "connect_rate_per_s": round(args.many / connect_s, 1) if connect_s > 0 else None,
            "latency_ms_p50_max": max(r.get("latency_ms", {}).get("p50", 0) for r in results),
            "latency_ms_p99_max": max(r.get("latency_ms", {}).get("p99", 0) for r in results),
            "memory_kb_per_device": {
                k: round((peak[k] - rss0[k]) / args.many, 2) for k in peak},
            "peak_rss_mb": {k: round(v / 1024, 1) for k, v in peak.items()},
            "all_answered": total("sent") == total("ok") and total("sent") > 0,
        })
    finally:
        node.close()
    return out


def api_call(port, method, path, body=None, token=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    hdrs = {}
    if body is not None or raw is not None:
        hdrs["Content-Type"] = "application/json"
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    t0 = time.perf_counter()
    conn.request(method, "/api/v1" + path, body=data, headers=hdrs)
    r = conn.getresponse()
    payload = r.read()
    dt = time.perf_counter() - t0
    conn.close()
    return r.status, payload, dt


def api_load(port, requests, clients, make):
    """Runs `requests` calls of make(i) -> (method, path, body, token, raw)
    from `clients` threads; returns throughput and latency percentiles."""
    lat, bad, lock = [], [0], threading.Lock()
    nxt = iter(range(requests))

    def worker():
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            method, path, body, token, raw = make(i)
            st, _, dt = api_call(port, method, path, body, token, raw)
            with lock:
                lat.append(dt)
                if st >= 300:
                    bad[0] += 1
    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    dur = time.perf_counter() - t0
    lat.sort()
    q = lambda f: round(1000 * lat[min(len(lat) - 1, int(f * len(lat)))], 2)
    return {"requests": requests, "clients": clients, "errors": bad[0],
            "throughput_per_s": round(requests / dur, 1),
            "latency_ms": {"p50": q(0.5), "p99": q(0.99), "max": round(1000 * lat[-1], 2),
                           "mean": round(1000 * statistics.mean(lat), 2)}}


def bench_hotswap(args):
    """Open loop at a few hundred measurements/s while the tenant's
    production version moves every second (issue: hot swap without a
    pause), against the same load with no move; the same node, one after
    the other."""
    node = Node(args.build, 20, prefix="hs")
    out = {"devices": 20, "rate_per_s": 300, "duration_s": args.hotswap_duration}
    try:
        serve, _ = node.start_serve()
        src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models",
                           "viscosity")
        for ver in ("1.0.0", "1.0.1"):
            d = os.path.join(node.dir, f"model-{ver}")
            shutil.copytree(src, d)
            man = json.load(open(os.path.join(d, "manifest.json")))
            man["version"] = ver
            json.dump(man, open(os.path.join(d, "manifest.json"), "w"))
            node.run([node.bin, "model", "push", d, "--data", node.dir])
            node.run([node.bin, "model", "approve", "viscosity", ver, "--data", node.dir])
        # Moves go through the API, as a data scientist would make them (a CLI
        # process a second would measure process start-up on 2 cores).
        pw = "hot swap passphrase 42"
        subprocess.run([node.bin, "user", "add", "swapper", "--tenant", "demo-hospital",
                        "--roles", "data_scientist", "--password-stdin", "--data", node.dir],
                       input=pw + "\n", text=True, check=True, capture_output=True)
        st, body, _ = api_call(node.ports["http"], "POST", "/auth/login",
                               {"tenant": "demo-hospital", "username": "swapper", "password": pw})
        token = json.loads(body)["access_token"]

        def deploy(ver):
            st, body, _ = api_call(node.ports["http"], "PUT", "/models/viscosity/aliases/production",
                                   {"version": ver}, token)
            if st != 200:
                raise RuntimeError(f"deploy {ver}: {st} {body[:200]}")
        deploy("1.0.0")
        time.sleep(1.5)
        rate = 300 / 20
        quiet = node.sim(20, rate=rate, duration=args.hotswap_duration, prefix="hs")
        moves = [0]
        stop = threading.Event()

        def mover():
            ver = "1.0.1"
            while not stop.wait(1.0):
                deploy(ver)
                moves[0] += 1
                ver = "1.0.0" if ver == "1.0.1" else "1.0.1"
        t = threading.Thread(target=mover, daemon=True)
        t.start()
        try:
            swapping = node.sim(20, rate=rate, duration=args.hotswap_duration, prefix="hs")
        finally:
            stop.set()
            t.join(10)
        for name, res in (("no_moves", quiet), ("moving", swapping)):
            out[name] = {"sent": res["sent"], "ok": res["ok"], "errors": res["errors"],
                         "timeouts": res["timeouts"], "latency_ms": res["latency_ms"]}
        out["moves"] = moves[0]
        failed = swapping["errors"] + swapping["timeouts"] + (swapping["sent"] - swapping["ok"])
        out["targets"] = {"failed_replies_max": 0, "failed_replies": failed,
                          "failed_replies_met": failed == 0,
                          "p99_ms_no_moves": quiet["latency_ms"]["p99"],
                          "p99_ms_moving": swapping["latency_ms"]["p99"]}
    finally:
        node.close()
    return out


def bench_api(args):
    """The HTTP API on one node, with measurements already stored."""
    node = Node(args.build, 1, prefix="api")
    serve, _ = node.start_serve()
    port = node.ports["http"]
    try:
        node.sim(1, inflight=4, duration=3, quiet=True, prefix="api")
        pw = "load test passphrase 42"
        subprocess.run([node.bin, "user", "add", "bench", "--tenant", "demo-hospital", "--roles",
                        "clinician,data_scientist", "--password-stdin", "--data", node.dir],
                       input=pw + "\n", text=True, check=True, capture_output=True)
        login = {"tenant": "demo-hospital", "username": "bench", "password": pw}
        st, body, _ = api_call(port, "POST", "/auth/login", login)
        token = json.loads(body)["access_token"]
        dev = node.devices[0]
        st, body, _ = api_call(port, "GET", f"/devices/{dev}/measurements?limit=1", token=token)
        mid = json.loads(body)["items"][0]["id"]
        st, body, _ = api_call(port, "GET", f"/devices/{dev}/measurements/{mid}", token=token)
        sample = json.loads(body)["measurement"]
        raw = json.dumps(sample).encode()
        cpu0 = proc_cpu_s(serve.pid)
        res = {
            "login": api_load(port, 40, 4, lambda i: ("POST", "/auth/login", login, None, None)),
            "measurements_page": api_load(
                port, 1000, 8, lambda i: ("GET", f"/devices/{dev}/measurements?limit=50", None,
                                          token, None)),
            "predict": api_load(port, 2000, 8, lambda i: ("POST", "/models/viscosity/predict",
                                                          None, token, raw)),
        }

        def stored(i):
            doc = dict(sample, id=f"api-store-{i:06d}")
            return ("POST", f"/models/viscosity/predict?store=true&device={dev}", None, token,
                    json.dumps(doc).encode())
        res["predict_store"] = api_load(port, 1000, 8, stored)
        res["serve_cpu_s"] = round(proc_cpu_s(serve.pid) - cpu0, 2)
        res["serve_peak_rss_mb"] = round(proc_mem_kb(serve.pid, "VmHWM") / 1024, 1)
        return res
    finally:
        node.close()


def bench_cluster(args):
    """1 node against 3 nodes on one PostgreSQL behind HAProxy (TCP, TLS passed
    through), closed loop through HAProxy with the same load. Everything runs
    on this machine: the nodes share its cores with PostgreSQL, HAProxy and the
    load generator, so this measures the cost of the cluster's moving parts
    here, not the capacity of nodes on their own machines."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                    "integration"))
    from pgserver import PgServer
    out = {"devices": args.devices, "inflight": args.inflight, "duration_s": args.duration,
           "cpus": os.cpu_count()}
    pg = PgServer(dbname="bench").start()
    nodes, haproxy, work = [], None, tempfile.mkdtemp(prefix="fleetml-bench-cluster-")
    try:
        for i in range(3):
            d = os.path.join(work, f"n{i + 1}")
            os.makedirs(os.path.join(d, "pki"), mode=0o700)
            if i:
                for f in ("ca.key", "ca.crt", "jwt.key"):
                    shutil.copy2(os.path.join(work, "n1", "pki", f), os.path.join(d, "pki", f))
            ports = dict(mqtt=free_port(), svc=free_port(), http=free_port(), ops=free_port())
            subprocess.run([os.path.join(args.build, "fleetml"), "init", "--data", d,
                            "--set", f"node.id=n{i + 1}", "--set", "broker.bind=127.0.0.1",
                            "--set", f"broker.port={ports['mqtt']}",
                            "--set", f"broker.service_port={ports['svc']}",
                            "--set", f"http.port={ports['http']}",
                            "--set", f"ops.port={ports['ops']}",
                            "--set", "node.log_level=warn", "--set", "pipeline.device_rate=0",
                            "--set", "pipeline.device_bytes_rate=0",
                            "--set", "store.backend=postgres", "--set", f"store.url={pg.url}"],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            nodes.append({"dir": d, "ports": ports, "proc": None})
        fm = os.path.join(args.build, "fleetml")
        devices = [f"cl-{i:04d}" for i in range(1, args.devices + 1)]
        for dv in devices:
            subprocess.run([fm, "device", "add", dv, "--data", nodes[0]["dir"]], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        front = free_port()

        def start_haproxy(active):
            servers = "\n".join(f"    server n{i + 1} 127.0.0.1:{n['ports']['mqtt']} check port "
                                 f"{n['ports']['ops']}" for i, n in enumerate(active))
            cfg = os.path.join(work, "haproxy.cfg")
            with open(cfg, "w") as fh:
                fh.write(f"""global
    maxconn 4000
defaults
    timeout connect 2s
    timeout client 75s
    timeout server 75s
    option redispatch
frontend mqtt
    bind 127.0.0.1:{front}
    mode tcp
    default_backend nodes
backend nodes
    mode tcp
    balance leastconn
    option httpchk
    http-check send meth GET uri /readyz
    default-server inter 300ms fall 2 rise 1
{servers}
""")
            log = open(os.path.join(work, "haproxy.log"), "ab")
            return subprocess.Popen(["/usr/sbin/haproxy", "-db", "-f", cfg], stdout=log,
                                    stderr=subprocess.STDOUT)

        def sim(devices=args.devices, duration=args.duration):
            argv = [fm, "sim", "--data", nodes[0]["dir"], "--devices", str(devices),
                    "--prefix", "cl", "--duration", str(duration), "--json", "--drain", "10",
                    "--payload-pool", "64", "--inflight", str(args.inflight),
                    "--set", f"broker.port={front}"]
            r = subprocess.run(argv, check=False, capture_output=True, text=True)
            lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
            if not lines:
                raise RuntimeError(f"sim failed: {r.stderr[-2000:]}")
            return json.loads(lines[-1])

        for count in (1, 3):
            active = nodes[:count]
            for n in active:
                if n["proc"] is None:
                    n["proc"] = subprocess.Popen(
                        [fm, "serve", "--data", n["dir"]], stdout=subprocess.DEVNULL,
                        stderr=open(os.path.join(n["dir"], "serve.log"), "ab"))
                    wait_for(lambda: (http_json(n["ports"]["ops"], "/readyz") or {}).get("ready"),
                             60, "a node to be ready")
            haproxy = start_haproxy(active)
            # Ready when a device is answered through it (first health checks).
            wait_for(lambda: sim(devices=1, duration=1)["ok"] > 0, 60, "HAProxy to pass traffic")
            res = sim()
            haproxy.terminate()
            haproxy.wait(10)
            haproxy = None
            out[f"nodes_{count}"] = {"throughput_per_s": res["throughput_per_s"],
                                     "latency_ms": res["latency_ms"], "ok": res["ok"],
                                     "errors": res["errors"], "timeouts": res["timeouts"]}
        one, three = out["nodes_1"]["throughput_per_s"], out["nodes_3"]["throughput_per_s"]
        out["ratio_3_to_1"] = round(three / one, 3) if one else None
        out["note"] = ("all processes share this machine's cores: a ratio near or below 1 "
                       "means the machine, not the design, is the limit")
    finally:
        if haproxy:
            haproxy.kill()
        for n in nodes:
            if n["proc"] and n["proc"].poll() is None:
                n["proc"].terminate()
                try:
                    n["proc"].wait(30)
                except subprocess.TimeoutExpired:
                    n["proc"].kill()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--devices", type=int, default=int(os.environ.get("FM_BENCH_DEVICES", 50)))
    ap.add_argument("--inflight", type=int, default=int(os.environ.get("FM_BENCH_INFLIGHT", 4)))
    ap.add_argument("--duration", type=float, default=float(os.environ.get("FM_BENCH_DURATION", 20)))
    ap.add_argument("--many", type=int, default=int(os.environ.get("FM_BENCH_MANY", 10000)))
    ap.add_argument("--many-duration", type=float,
                    default=float(os.environ.get("FM_BENCH_MANY_DURATION", 120)))
    ap.add_argument("--connect-rate", type=float,
                    default=float(os.environ.get("FM_BENCH_CONNECT_RATE", 150)),
                    help="new connections per second for the whole fleet")
    ap.add_argument("--latency-duration", type=float,
                    default=float(os.environ.get("FM_BENCH_LATENCY_DURATION", 60)),
                    help="seconds per open-loop run of the latency section")
    ap.add_argument("--hotswap-duration", type=float,
                    default=float(os.environ.get("FM_BENCH_HOTSWAP_DURATION", 20)))
    ap.add_argument("--flood-duration", type=float,
                    default=float(os.environ.get("FM_BENCH_FLOOD_DURATION", 20)),
                    help="seconds the good device sends during the flood section")
    ap.add_argument("--only", choices=["pipeline", "latency", "pair", "many", "api", "hotswap",
                                       "cluster", "functions", "processor", "flood"])
    ap.add_argument("--out")
    args = ap.parse_args()
    args.build = os.path.abspath(args.build)
    result = {"bench": "fleetml", "cpus": os.cpu_count()}
    if args.only in (None, "pipeline"):
        result["pipeline"] = bench_pipeline_cpu(args)
        result["pipeline_postgres"] = bench_pipeline_postgres(args)
    if args.only in (None, "latency"):
        result["latency"] = bench_latency(args)
    if args.only == "pair":
        result["pair"] = bench_pair(args)
    if args.only in (None, "flood"):
        result["flood"] = bench_flood(args)
    if args.only in (None, "many") and args.many > 0:
        result["many_devices"] = bench_many(args)
    if args.only in (None, "api"):
        result["api"] = bench_api(args)
    if args.only in (None, "hotswap"):
        result["hotswap"] = bench_hotswap(args)
    if args.only in (None, "cluster"):
        result["cluster"] = bench_cluster(args)
    if args.only in (None, "functions"):
        result["functions"] = bench_functions(args)
    if args.only in (None, "processor"):
        result["processor"] = bench_processor(args)
    text = json.dumps(result)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
