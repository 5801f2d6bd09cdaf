"""Shared helpers for the black-box integration tests.

Everything here talks to `fleetml` only through its documented surfaces:
the command line, MQTT over mutual TLS, HTTP on loopback, the SQLite file
(read-only) and the lake directory.  No fleetml code is imported.

Waiting is always done on a condition with a deadline (`wait_for`), never by
sleeping for a fixed time and hoping the daemon was fast enough.
"""

import gzip
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

TENANT = "demo-hospital"
CONE_RADIUS_M = 0.024
DEFAULT_RATES = [1, 2, 5, 10, 20, 50, 100, 200, 300, 450]
LAKE_OBJECT_RE = re.compile(r"^[A-Za-z0-9._-]+-\d{12}\.ndjson\.gz$")


# --------------------------------------------------------------------------
# Generic waiting and ports


class WaitTimeout(AssertionError):
    pass


def wait_for(pred, timeout, interval=0.02, msg=None):
    """Polls pred() until it returns a truthy value, which is returned.

    Exceptions raised by pred count as "not yet" (the daemon may still be
    starting) but the last one is reported if the deadline passes."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = pred()
            if v:
                return v
            last_exc = None
        except Exception as e:  # noqa: BLE001 - reported on timeout
            last_exc = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise WaitTimeout(f"timed out after {timeout}s waiting for {msg or pred}{detail}")
        time.sleep(interval)


def free_ports(n):
    """Returns n distinct free loopback TCP ports (bound to port 0 and
    released; the sockets are held together so the ports differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pid_alive(pid):
    """True when pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def vm_rss_kb(pid):
    """Resident set size of pid in KiB (VmRSS in /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def proc_cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pids_mentioning(text):
    """Pids of processes whose command line, cwd or open files mention text
    (a test's unique data directory: used to find mosquitto children
    orphaned by kill -9, which may run as the `mosquitto` user)."""
    out = []
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        pid = int(d)
        hit = text in proc_cmdline(pid)
        if not hit:
            try:
                hit = text in os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                pass
        if not hit:
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    try:
                        if text in os.readlink(f"/proc/{pid}/fd/{fd}"):
                            hit = True
                            break
                    except OSError:
                        pass
            except OSError:
                pass
        if hit and pid_alive(pid):
            out.append(pid)
    return out


def file_digests(root):
    """{relative path: (sha256, mode)} for every regular file under root."""
    out = {}
    root = Path(root)
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = (
                hashlib.sha256(p.read_bytes()).hexdigest(),
                p.stat().st_mode & 0o7777,
            )
    return out


# --------------------------------------------------------------------------
# Measurements


def now_rfc3339():
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def true_eta_pas(g):
    """Apparent viscosity (Pa*s) of the synthetic 'blood' used by the tests."""
    return 0.0038 + 0.012 / (1.0 + g ** 0.6)


def torque_unm(eta_pas, g):
    tau = eta_pas * g
    return tau * 2.0 * math.pi * CONE_RADIUS_M ** 3 / 3.0 * 1e6


def make_sweep(rates=DEFAULT_RATES, n=30, noise=0.005, seed=None):
    rng = random.Random(seed)
    steps = []
    for g in rates:
        m = torque_unm(true_eta_pas(g), g)
        steps.append({
            "shear_rate_s": float(g),
            "samples": [round(m * (1.0 + rng.gauss(0.0, noise)), 6) for _ in range(n)],
        })
    return steps


def make_measurement(mid, **overrides):
    doc = {
        "id": mid,
        "taken_at": now_rfc3339(),
        "kind": "viscosity.sweep.v1",
        "temperature_c": 37.0,
        "sweep": make_sweep(seed=mid),
        "firmware": "it-1.0",
    }
    doc.update(overrides)
    return doc


def encode(doc):
    return json.dumps(doc, separators=(",", ":")).encode()


_uniq = [0]
_uniq_lock = threading.Lock()


def unique_id(prefix="m"):
    with _uniq_lock:
        _uniq[0] += 1
        n = _uniq[0]
    return f"{prefix}-{os.getpid()}-{n}-{random.randrange(1 << 30):08x}"


# --------------------------------------------------------------------------
# Prometheus text


_METRIC_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text):
    """[(name, {label: value}, float)] for every sample line."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC_RE.match(line)
        if not m:
            continue
        labels = {}
        if m.group(2):
            for k, v in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2)):
                labels[k] = v
        out.append((m.group(1), labels, float(m.group(3))))
    return out


def metric_value(text, name, **labels):
    """Sum of samples named name whose labels include labels; None if none."""
    total = None
    for n, lab, v in parse_metrics(text):
        if n == name and all(lab.get(k) == val for k, val in labels.items()):
            total = (total or 0.0) + v
    return total


# --------------------------------------------------------------------------
# The platform under test


def model_dir():
    """The trained model (`make model`): FM_MODEL_DIR, else the repository's
    models/viscosity.  Given as an absolute path because the configured
    default is relative to serve's working directory."""
    d = os.environ.get("FM_MODEL_DIR")
    if d:
        return os.path.abspath(d)
    return str((Path(__file__).resolve().parents[2] / "models" / "viscosity"))


# Set by conftest.py when FM_IT_STORE=postgres: returns a new database's URL.
_store_database = None
# Set by conftest.py when FM_IT_LAKE=s3: the session's S3Gate.
_lake_gate = None


def store_database():
    """A fresh PostgreSQL database URL when the suite runs on PostgreSQL,
    else None (SQLite in the data directory)."""
    return _store_database() if _store_database else None


def on_postgres():
    return _store_database is not None


class Platform:
    """One data directory and (at most) one `fleetml serve` process."""

    def __init__(self, fm_bin, workdir, node_id="it-node"):
        self.bin = fm_bin
        self.workdir = Path(workdir)
        self.data = self.workdir / "data"
        self.node_id = node_id
        self.broker_port, self.service_port, self.http_port, self.ops_port = free_ports(4)
        self.proc = None
        self.log_paths = []
        self.broker_pids = set()
        self.admin_password = None
        self.env = dict(os.environ)
        # Extra `--set key=value` pairs for init (e.g. pki.rotation_grace_s).
        self.extra_sets = {}
        # FM_IT_STORE=postgres runs the suite on PostgreSQL: each platform
        # gets its own database on the session's server (conftest.py).
        self.pg_url = store_database()
        if self.pg_url:
            self.extra_sets.update({"store.backend": "postgres", "store.url": self.pg_url})
        # FM_IT_LAKE=s3: the lake is the session's S3 store, under a prefix of
        # this platform's own (lake_objects and lake_read read it back).
        self.s3 = _lake_gate
        self.s3_prefix = f"{workdir.name if hasattr(workdir, 'name') else 'p'}-{id(self):x}/"
        if self.s3:
            self.extra_sets.update(self.s3.lake_sets("path", self.s3_prefix))

    # -- CLI --------------------------------------------------------------

    def sets(self):
        base = {
            "broker.bind": "127.0.0.1",
            "broker.port": str(self.broker_port),
            "broker.service_port": str(self.service_port),
            "http.port": str(self.http_port),
            "ops.port": str(self.ops_port),
            "lake.roll_seconds": "1",
            "node.id": self.node_id,
            "model.dir": model_dir(),
        }
        base.update(self.extra_sets)
        return base

    def run(self, *args, check=True, timeout=60):
        cmd = [self.bin, *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env=self.env, cwd=self.workdir, start_new_session=True)
        if check and r.returncode != 0:
            raise AssertionError(
                f"{' '.join(map(str, cmd))} exited {r.returncode}\n"
                f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}")
        return r

    def cli(self, *args, check=True, timeout=60):
        """Runs a fleetml subcommand against this platform's data directory."""
        return self.run(*args, "--data", str(self.data), check=check, timeout=timeout)

    def init(self):
        args = ["init", "--data", str(self.data)]
        for k, v in self.sets().items():
            args += ["--set", f"{k}={v}"]
        r = self.run(*args)
        m = re.search(r"admin password: (\S+)", r.stdout)
        self.admin_password = m.group(1) if m else None
        return r

    def add_device(self, device_id, check=True):
        return self.run("device", "add", device_id, "--data", str(self.data),
                        "--tenant", TENANT, check=check)

    def device_dir(self, device_id):
        return self.data / "devices" / device_id

    @property
    def ca_cert(self):
        return str(self.data / "pki" / "ca.crt")

    # -- serve ------------------------------------------------------------

    def start(self, wait_ready=True, timeout=30, extra_args=()):
        assert self.proc is None or self.proc.poll() is not None, "serve already running"
        log = self.workdir / f"serve-{len(self.log_paths)}.log"
        self.log_paths.append(log)
        self._log_f = open(log, "wb")
        self.proc = subprocess.Popen(
            [self.bin, "serve", "--data", str(self.data), *extra_args],
            stdin=subprocess.DEVNULL, stdout=self._log_f, stderr=subprocess.STDOUT,
            env=self.env, cwd=self.workdir, start_new_session=True)
        if wait_ready:
            self.wait_ready(timeout)
        return self.proc

    def _check_alive(self):
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"fleetml serve exited with {self.proc.returncode}\n{self.log_tail()}")

    def wait_ready(self, timeout=30):
        def ready():
            self._check_alive()
            st, _ = self.http("/readyz")
            return st == 200
        try:
            wait_for(ready, timeout, interval=0.05, msg="GET /readyz == 200")
        except WaitTimeout as e:
            raise AssertionError(f"{e}\nlast /readyz: {self.http_safe('/readyz')}\n"
                                 f"{self.log_tail()}") from None
        self.note_broker_pid()

    def note_broker_pid(self):
        try:
            st, body = self.http("/healthz")
            pid = json.loads(body).get("broker_pid")
            if isinstance(pid, int) and pid > 0:
                self.broker_pids.add(pid)
                return pid
        except Exception:  # noqa: BLE001
            pass
        return None

    def stop(self, timeout=15):
        """SIGTERM serve and return its exit status (None if not running)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._killpg(self.proc.pid)
                self.proc.wait(5)
                self._log_f.close()
                raise AssertionError(f"serve did not exit within {timeout}s of SIGTERM\n"
                                     f"{self.log_tail()}")
        self._log_f.close()
        return self.proc.returncode

    def kill9(self):
        """kill -9 the serve process only (its broker child may survive)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log_f.close()

    @staticmethod
    def _killpg(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def cleanup(self):
        """Leaves no process behind, whatever state the test left."""
        if self.proc is not None:
            self._killpg(self.proc.pid)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            try:
                self._log_f.close()
            except Exception:  # noqa: BLE001
                pass
        # Brokers that serve started: remembered from /healthz, or found by
        # the data directory they use (a broker orphaned by kill -9 of serve
        # may sit in another session, out of reach of killpg).
        for pid in self.broker_pids:
            if pid_alive(pid) and "mosquitto" in proc_cmdline(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for pid in pids_mentioning(str(self.data)):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def log_tail(self, n=60):
        out = []
        for p in self.log_paths[-2:]:
            try:
                lines = p.read_text(errors="replace").splitlines()[-n:]
            except OSError:
                lines = []
            out.append(f"--- {p.name} (last {n} lines) ---")
            out.extend(lines)
        return "\n".join(out)

    # -- HTTP ---------------------------------------------------------------

    @property
    def http_tls(self):
        return self.extra_sets.get("http.tls") == "on"

    def http_context(self):
        """TLS context trusting this platform's CA (for http.tls=on)."""
        return ssl.create_default_context(cafile=self.ca_cert)

    def http(self, path, timeout=3):
        """GET path: /api/... and /healthz-on-the-API go to the API listener
        (api_http), everything else (health, readiness, metrics, OpenAPI)
        to the operations listener (plain HTTP on loopback)."""
        if path.startswith("/api/"):
            return self.api_http(path, timeout)
        return self._get(f"http://127.0.0.1:{self.ops_port}{path}", None, timeout)

    def api_http(self, path, timeout=3):
        scheme = "https" if self.http_tls else "http"
        ctx = self.http_context() if self.http_tls else None
        return self._get(f"{scheme}://127.0.0.1:{self.http_port}{path}", ctx, timeout)

    @staticmethod
    def _get(url, ctx, timeout):
        try:
            with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def http_safe(self, path):
        try:
            return self.http(path)
        except Exception as e:  # noqa: BLE001
            return repr(e)

    def healthz(self):
        st, body = self.http("/healthz")
        assert st == 200, f"/healthz {st}: {body}"
        return json.loads(body)

    def metrics(self):
        st, body = self.http("/metrics")
        assert st == 200, f"/metrics {st}: {body[:500]}"
        return body

    # -- database and lake --------------------------------------------------

    @property
    def db_path(self):
        return self.data / "db" / "fleetml.db"

    def query(self, sql, *args):
        """Rows of sql (with ? placeholders) from the platform's database,
        SQLite or PostgreSQL."""
        if self.pg_url:
            import psycopg2
            con = psycopg2.connect(self.pg_url)
            try:
                with con.cursor() as cur:
                    if args:
                        cur.execute(sql.replace("%", "%%").replace("?", "%s"), args)
                    else:
                        cur.execute(sql)
                    return [tuple(r) for r in cur.fetchall()]
            finally:
                con.close()
        con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def count_measurements(self, device_id, measurement_id=None):
        if measurement_id is None:
            return self.query("SELECT count(*) FROM measurements WHERE device_id = ?",
                              device_id)[0][0]
        return self.query("SELECT count(*) FROM measurements WHERE device_id = ? "
                          "AND measurement_id = ?", device_id, measurement_id)[0][0]

    def quarantine_rows(self, device_id):
        return self.query("SELECT error_code, error_message, payload FROM quarantine "
                          "WHERE device_id = ? ORDER BY seq", device_id)

    @property
    def on_session_s3(self):
        """The lake is the session's S3 store (FM_IT_LAKE=s3), not overridden
        by the test's own settings."""
        return bool(self.s3) and self.extra_sets.get("lake.backend") == "s3" and \
            self.extra_sets.get("lake.s3_endpoint") == self.s3.endpoint and \
            self.extra_sets.get("lake.s3_prefix") == self.s3_prefix

    def lake_objects(self, area="raw"):
        """Every object under lake/<area>/, as <data>/lake/<key> paths (on S3
        too, where the key is read back through the gate)."""
        if self.on_session_s3:
            keys = self.s3.keys(self.s3_prefix + area + "/")
            return sorted(self.data / "lake" / k[len(self.s3_prefix):] for k in keys)
        root = self.data / "lake" / area
        if not root.exists():
            return []
        return sorted(p for p in root.rglob("*") if p.is_file())

    def lake_read(self, path):
        """Bytes of the lake object at a lake_objects() path."""
        if self.on_session_s3:
            rel = Path(path).relative_to(self.data / "lake")
            return self.s3.get(self.s3_prefix + rel.as_posix())
        return Path(path).read_bytes()

    def lake_exists(self, rel):
        """Whether lake/<rel> (an object, or a prefix of some) exists."""
        if self.on_session_s3:
            return bool(self.s3.keys(self.s3_prefix + rel))
        return (self.data / "lake" / rel).exists()

    def lake_records(self, area="raw"):
        """[(object path, record dict)] for every line of every object."""
        out = []
        for p in self.lake_objects(area):
            try:
                text = gzip.decompress(self.lake_read(p)).decode()
            except (OSError, EOFError):
                continue  # still being written (fs) or gone
            for line in text.splitlines():
                if line.strip():
                    out.append((p, json.loads(line)))
        return out


def check_lake_layout(p):
    raw = p.data / "lake" / "raw"
    for obj in p.lake_objects("raw"):
        rel = obj.relative_to(raw).parts
        assert len(rel) == 4, f"unexpected lake path {obj}"
        assert rel[0] == f"tenant={TENANT}", obj
        assert re.fullmatch(r"date=\d{4}-\d{2}-\d{2}", rel[1]), obj
        assert re.fullmatch(r"hour=\d{2}", rel[2]), obj
        assert LAKE_OBJECT_RE.match(rel[3]), f"temporary or misnamed object visible: {obj}"
        assert rel[3].startswith(p.node_id + "-"), obj

# --------------------------------------------------------------------------
# Several nodes, and devices with the SDK's outbox


def join_cluster(first, node):
    """Initialises `node` as another node of `first`'s cluster: the same CA
    and token-signing key, copied before `fleetml init` (docs/operations.md,
    "Adding a node")."""
    (node.data / "pki").mkdir(parents=True, mode=0o700)
    for f in ("ca.key", "ca.crt", "jwt.key"):
        shutil.copy2(first.data / "pki" / f, node.data / "pki" / f)
    node.init()


RESULT_RE = re.compile(r"^(m-[A-Za-z0-9._:-]+) (ok|error|dropped|timeout)\b(?: (\S+))?")


def start_device_runs(p, ids, workdir, count, interval="0.05", timeout="3", extra=()):
    """`fleetml device run` (the SDK with its outbox) for each id, with the
    keys in p's data directory; returns the runs for device_run_results."""
    runs = []
    for d in ids:
        state = workdir / f"state-{d}"
        state.mkdir()
        outp = workdir / f"{d}.out"
        out = open(outp, "wb")
        runs.append((d, outp, out, subprocess.Popen(
            [p.bin, "device", "run", d, "--data", str(p.data), "--state", str(state),
             *extra, "--interval", interval, "--timeout", timeout, "--count", str(count)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=p.env,
            cwd=p.workdir, start_new_session=True)))
    return runs


def device_run_results(runs, timeout=300):
    """Waits for the runs; ({(device, measurement id) answered ok},
    [(device, measurement id, error code) of the other answers])."""
    ok, errors = set(), []
    for d, outp, out, proc in runs:
        assert proc.wait(timeout) == 0, outp.read_text()[-2000:]
        out.close()
        for ln in outp.read_text().splitlines():
            m = RESULT_RE.match(ln)
            if m and m.group(2) == "ok":
                ok.add((d, m.group(1)))
            elif m:
                errors.append((d, m.group(1), m.group(3)))
    return ok, errors


# --------------------------------------------------------------------------
# Devices


class Message:
    def __init__(self, topic, payload, props, t):
        self.topic = topic
        self.payload = payload
        self.props = props
        self.t = t

    def json(self):
        return json.loads(self.payload)

    @property
    def correlation(self):
        return getattr(self.props, "CorrelationData", None) if self.props else None

    def __repr__(self):
        return f"Message({self.topic!r}, {self.payload[:200]!r})"


class Device:
    """A paho MQTT v5 client over mutual TLS that records everything it
    receives.  Replies are matched by the measurement id in the payload."""

    def __init__(self, platform, device_id, client_id=None, certfile=None, keyfile=None,
                 ca_certs=None, reconnect=False, port=None):
        self.platform = platform
        self.device_id = device_id
        self.client_id = client_id if client_id is not None else device_id
        ddir = platform.device_dir(device_id) if device_id else None
        self.certfile = certfile if certfile is not None else (
            str(ddir / "device.crt") if ddir else None)
        self.keyfile = keyfile if keyfile is not None else (
            str(ddir / "device.key") if ddir else None)
        self.ca_certs = ca_certs or platform.ca_cert
        self.port = port or platform.broker_port
        self.reconnect = reconnect
        self.cond = threading.Condition()
        self.messages = []
        self.connacks = []      # reason code values
        self.disconnects = []   # reason code values / ints
        self.lost_times = []    # time.monotonic() of every disconnect or network error
        self.subacks = {}       # mid -> [reason code values]
        self.subscriptions = []  # (topic, qos) re-subscribed on reconnect
        self.published = set()
        self._stop = threading.Event()
        self.client = mqtt.Client(client_id=self.client_id, protocol=mqtt.MQTTv5,
                                  reconnect_on_failure=reconnect)
        if self.certfile:
            self.client.tls_set(ca_certs=self.ca_certs, certfile=self.certfile,
                                keyfile=self.keyfile, cert_reqs=ssl.CERT_REQUIRED)
        else:
            self.client.tls_set(ca_certs=self.ca_certs, cert_reqs=ssl.CERT_REQUIRED)
        self.client.tls_insecure_set(False)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        # paho 1.6's own network thread dies on an SSL error raised while
        # reading (e.g. a TLS 1.3 alert for a refused client certificate, or
        # a broker killed mid-record); ours records it and, for reconnecting
        # devices, reconnects.  loop_start()/loop_stop() still manage it.
        self.client._thread_main = self._net_main
        self.errors = []
        self.started = False

    def _net_main(self):
        c = self.client
        while not c._thread_terminate:
            try:
                rc = c.loop(timeout=0.05)
            except Exception as e:  # noqa: BLE001
                rc = None
                with self.cond:
                    self.errors.append(repr(e))
                    self.lost_times.append(time.monotonic())
                    self.cond.notify_all()
            if rc == mqtt.MQTT_ERR_SUCCESS:
                continue
            if not self.reconnect or c._thread_terminate:
                break
            if self._stop.wait(0.2):
                break
            try:
                c.reconnect()
            except Exception as e:  # noqa: BLE001
                with self.cond:
                    self.errors.append(repr(e))
                    self.cond.notify_all()

    # -- callbacks ------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, rc, properties=None):
        v = rc.value if hasattr(rc, "value") else int(rc)
        with self.cond:
            self.connacks.append(v)
            self.cond.notify_all()
        if v < 0x80:
            for topic, qos in self.subscriptions:
                client.subscribe(topic, qos)

    def _on_disconnect(self, client, userdata, rc, properties=None):
        v = rc.value if hasattr(rc, "value") else int(rc)
        with self.cond:
            self.disconnects.append(v)
            self.lost_times.append(time.monotonic())
            self.cond.notify_all()

    def _on_message(self, client, userdata, msg):
        m = Message(msg.topic, msg.payload, getattr(msg, "properties", None), time.monotonic())
        with self.cond:
            self.messages.append(m)
            self.cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, rcs, properties=None):
        with self.cond:
            self.subacks[mid] = [r.value if hasattr(r, "value") else int(r) for r in rcs]
            self.cond.notify_all()

    def _on_publish(self, client, userdata, mid):
        with self.cond:
            self.published.add(mid)
            self.cond.notify_all()

    # -- connection -------------------------------------------------------------

    def _wait(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                v = pred()
                if v:
                    return v
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(f"{self.client_id}: timed out after {timeout}s "
                                      f"waiting for {what}")
                self.cond.wait(min(left, 0.1))

    def connect(self, timeout=10):
        """Connects and requires a successful CONNACK."""
        outcome = self.try_connect(timeout)
        assert outcome == "connected", (
            f"{self.client_id} could not connect: {outcome}\n{self.platform.log_tail(20)}")
        return self

    def try_connect(self, timeout=5):
        """Returns "connected", or a string describing why not: an exception
        at TCP/TLS level, a failing CONNACK reason code, or the connection
        being closed.  Raises WaitTimeout if nothing at all happens."""
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        except (ssl.SSLError, OSError) as e:
            return f"exception: {e!r}"
        self.client.loop_start()
        self.started = True

        def decided():
            if any(v < 0x80 for v in self.connacks):
                return "connected"
            if self.connacks:
                return f"connack reason 0x{self.connacks[-1]:02x}"
            if self.disconnects:
                return f"disconnected rc={self.disconnects[-1]}"
            if self.errors:
                return f"error: {self.errors[-1]}"
            return None
        try:
            return self._wait(decided, timeout, "CONNACK or disconnect")
        except WaitTimeout:
            return "timeout"

    def wait_connected(self, timeout, after=0):
        """Waits for a successful CONNACK beyond the first `after` ones."""
        return self._wait(lambda: any(v < 0x80 for v in self.connacks[after:]), timeout,
                          "a successful (re)connect")

    def wait_lost(self, timeout, after=0):
        """Waits until the connection is lost (disconnect or network error
        beyond the first `after` ones) and returns its monotonic time."""
        return self._wait(lambda: self.lost_times[after:] and self.lost_times[after],
                          timeout, "the connection to be closed")

    def close(self):
        """Disconnects cleanly: waits (briefly) until the DISCONNECT is sent
        before the network thread stops, so the broker sees the device leave
        at once rather than at its keepalive timeout."""
        self._stop.set()
        try:
            if self.started:
                connected = self.client.is_connected()
                n = len(self.disconnects)
                self.client.disconnect()
                if connected:
                    try:
                        self._wait(lambda: len(self.disconnects) > n, 2, "the DISCONNECT sent")
                    except WaitTimeout:
                        pass
                self.client.loop_stop()
        except Exception:  # noqa: BLE001
            pass
        self.started = False

    # -- pub/sub ----------------------------------------------------------------

    @property
    def results_topic(self):
        return f"fleet/{self.device_id}/results"

    @property
    def measurements_topic(self):
        return f"fleet/{self.device_id}/measurements"

    def subscribe(self, topic, qos=1, timeout=5, keep=True):
        """Subscribes and returns the SUBACK reason code values."""
        rc, mid = self.client.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe({topic}) rc={rc}"
        codes = self._wait(lambda: self.subacks.get(mid), timeout, f"SUBACK for {topic}")
        if keep and all(c < 0x80 for c in codes):
            self.subscriptions.append((topic, qos))
        return codes

    def publish(self, payload, topic=None, qos=1, response_topic=None, correlation=None):
        props = None
        if response_topic is not None or correlation is not None:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
        if isinstance(payload, dict):
            payload = encode(payload)
        info = self.client.publish(topic or self.measurements_topic, payload, qos=qos,
                                   properties=props)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish rc={info.rc}"
        return info

    def wait_puback(self, info, timeout=5):
        self._wait(lambda: info.mid in self.published, timeout, f"PUBACK for mid {info.mid}")

    def mark(self):
        with self.cond:
            return len(self.messages)

    def wait_message(self, pred, timeout=5, since=0, what="a message"):
        def find():
            for m in self.messages[since:]:
                try:
                    if pred(m):
                        return m
                except Exception:  # noqa: BLE001 - e.g. non-JSON payload
                    pass
            return None
        return self._wait(find, timeout, what)

    def messages_matching(self, pred, since=0):
        with self.cond:
            msgs = list(self.messages[since:])
        out = []
        for m in msgs:
            try:
                if pred(m):
                    out.append(m)
            except Exception:  # noqa: BLE001
                pass
        return out

    def wait_reply(self, mid, timeout=5, since=0, topic=None):
        topic = topic or self.results_topic
        return self.wait_message(
            lambda m: m.topic == topic and m.json().get("id") == mid,
            timeout, since, f"reply to {mid!r} on {topic}")

    def measure(self, doc_or_bytes, mid=None, timeout=5, **kw):
        """Publishes a measurement and returns (reply Message, latency s)."""
        if mid is None:
            mid = doc_or_bytes["id"] if isinstance(doc_or_bytes, dict) else ""
        since = self.mark()
        t0 = time.monotonic()
        self.publish(doc_or_bytes, **kw)
        m = self.wait_reply(mid, timeout, since)
        return m, m.t - t0


# --------------------------------------------------------------------------
# A certificate authority that is not the platform's


def openssl(*args, cwd):
    r = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=cwd, timeout=60)
    assert r.returncode == 0, f"openssl {' '.join(args)} failed:\n{r.stderr}"
    return r


def make_foreign_client_cert(tmpdir, cn):
    """Creates a self-made CA and a client certificate with CN=cn signed by
    it.  Returns (cert path, key path)."""
    d = Path(tmpdir)
    d.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", "rogue-ca.key", "-out", "rogue-ca.crt", "-days", "2",
            "-subj", "/CN=rogue-ca", cwd=d)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "client.key", "-out", "client.csr", "-subj", f"/CN={cn}", cwd=d)
    ext = d / "ext.cnf"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                   "extendedKeyUsage=clientAuth\n")
    openssl("x509", "-req", "-in", "client.csr", "-CA", "rogue-ca.crt", "-CAkey",
            "rogue-ca.key", "-CAcreateserial", "-out", "client.crt", "-days", "2",
            "-extfile", "ext.cnf", cwd=d)
    return str(d / "client.crt"), str(d / "client.key")


# --------------------------------------------------------------------------
# Keys, certificate signing requests and certificates (openssl CLI)


def make_csr(tmpdir, name, key="ec", cn="it-requested-cn", ca=False):
    """Creates a private key and a PEM CSR in tmpdir.  key is "ec" (P-256),
    "secp256k1", "rsa1024" or "rsa2048"; ca=True asks for basicConstraints
    CA:TRUE.  Returns (key path, CSR PEM text)."""
    d = Path(tmpdir)
    d.mkdir(parents=True, exist_ok=True)
    keyfile, csrfile = f"{name}.key", f"{name}.csr"
    if key == "ec":
        openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", keyfile, cwd=d)
    elif key == "secp256k1":
        openssl("ecparam", "-name", "secp256k1", "-genkey", "-noout", "-out", keyfile, cwd=d)
    elif key.startswith("rsa"):
        openssl("genrsa", "-out", keyfile, key[3:], cwd=d)
    else:
        raise ValueError(key)
    args = ["req", "-new", "-key", keyfile, "-subj", f"/CN={cn}", "-out", csrfile]
    if ca:
        args += ["-addext", "basicConstraints=critical,CA:TRUE"]
    openssl(*args, cwd=d)
    return str(d / keyfile), (d / csrfile).read_text()


def corrupt_csr_signature(tmpdir, csr_pem):
    """The same CSR with the last byte of its DER encoding (the end of the
    signature) flipped: still parseable, signature no longer valid."""
    import base64
    d = Path(tmpdir)
    src = d / f"corrupt-{unique_id('c')}.csr"
    src.write_text(csr_pem)
    der = d / (src.name + ".der")
    openssl("req", "-in", src.name, "-outform", "DER", "-out", der.name, cwd=d)
    raw = bytearray(der.read_bytes())
    raw[-1] ^= 0x01
    b64 = base64.b64encode(bytes(raw)).decode()
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return ("-----BEGIN CERTIFICATE REQUEST-----\n" + "\n".join(lines)
            + "\n-----END CERTIFICATE REQUEST-----\n")


def cert_info(cert):
    """(serial as int, subject CN) of a PEM certificate (path or PEM text)."""
    if isinstance(cert, (str, Path)) and not str(cert).lstrip().startswith("-----BEGIN"):
        pem = Path(cert).read_text()
    else:
        pem = str(cert)
    r = subprocess.run(["openssl", "x509", "-noout", "-serial", "-subject", "-nameopt", "RFC2253"],
                       input=pem, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"not a PEM certificate: {r.stderr}\n{pem[:200]}"
    serial = re.search(r"serial=([0-9A-Fa-f]+)", r.stdout)
    cn = re.search(r"CN=([^,\n]+)", r.stdout)
    return int(serial.group(1), 16), (cn.group(1) if cn else None)


# --------------------------------------------------------------------------
# Published JSON Schemas (docs/schemas/)


def check_against_schema(name, doc):
    """Validates a document the daemon sent against docs/schemas/<name>
    when python3-jsonschema is installed (otherwise does nothing)."""
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - depends on the host
        return
    path = Path(__file__).resolve().parents[2] / "docs" / "schemas" / name
    schema = json.loads(path.read_text())
    cls = jsonschema.Draft202012Validator
    errors = [e.message for e in cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(doc)]
    assert not errors, f"{name}: {errors}\n{json.dumps(doc)[:500]}"
