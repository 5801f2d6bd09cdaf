"""HTTP surface (issue acceptance item 9): health, readiness, metrics."""

import json

from helpers import encode, make_measurement, metric_value, pid_alive, unique_id, wait_for

REQUIRED_METRICS = [
    "fleetml_measurements_received_total",
    "fleetml_measurements_stored_total",
    "fleetml_measurements_rejected_total",
    "fleetml_replies_total",
    "fleetml_inference_seconds_bucket",
    "fleetml_commit_batch_size_bucket",
    "fleetml_broker_restarts_total",
    "fleetml_lake_backlog",
]


def test_healthz(platform):
    st, body = platform.http("/healthz")
    assert st == 200, body
    h = json.loads(body)
    assert h.get("status") == "ok", h
    pid = h.get("broker_pid")
    assert isinstance(pid, int) and not isinstance(pid, bool) and pid > 0, h
    assert pid_alive(pid), f"broker_pid {pid} is not a live process"


def test_readyz(platform):
    st, body = platform.http("/readyz")
    assert st == 200, body
    r = json.loads(body)
    assert r.get("ready") is True, r
    assert isinstance(r.get("checks"), dict) and r["checks"], r


def test_readyz_consistent_during_startup(make_platform):
    # From the first answer on, /readyz says 503 or 200 and its body agrees.
    p = make_platform(start=False, name="startup")
    p.start(wait_ready=False)
    statuses = []

    def seen_ready():
        p._check_alive()
        st, body = p.http("/readyz")
        statuses.append((st, body))
        return st == 200
    wait_for(seen_ready, 40, interval=0.01, msg="/readyz 200")
    for st, body in statuses:
        assert st in (200, 503), (st, body)
        r = json.loads(body)
        assert r.get("ready") is (st == 200), f"status {st} with body {r}"
        assert isinstance(r.get("checks"), dict), r


def test_never_ready_without_model(make_platform, tmp_path):
    # Without a model serve may refuse to start (exit non-zero, saying why)
    # or run and report not-ready with a failing model check; it must never
    # claim readiness.
    p = make_platform(start=False, name="nomodel")
    empty = tmp_path / "no-model"
    empty.mkdir()
    p.start(wait_ready=False, extra_args=["--set", f"model.dir={empty}"])

    def decided():
        if p.proc.poll() is not None:
            return "exited"
        st, body = p.http("/readyz")
        r = json.loads(body)
        checks = r.get("checks") or {}
        others = [v for k, v in checks.items() if "model" not in k]
        return (r, st) if others and all(v in (True, "ok") for v in others) else None
    got = wait_for(decided, 30, interval=0.05,
                   msg="serve to exit or all non-model readiness checks to pass")
    if got == "exited":
        assert p.proc.returncode != 0, "serve exited 0 without a model"
        assert "model" in p.log_tail(), f"exit without naming the model\n{p.log_tail()}"
        return
    r, st = got
    assert st == 503, f"/readyz {st} {r} without a model"
    assert r.get("ready") is False, r
    model_checks = {k: v for k, v in r["checks"].items() if "model" in k}
    assert model_checks and all(v not in (True, "ok") for v in model_checks.values()), r
    st, body = p.http("/healthz")
    assert st == 200, body


def test_metrics_move(platform, connected):
    text = platform.metrics()
    names = {line.split("{")[0].split()[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    missing = [m for m in REQUIRED_METRICS if m not in names]
    assert not missing, f"missing metrics: {missing}"

    def snapshot():
        t = platform.metrics()
        return {
            "received": metric_value(t, "fleetml_measurements_received_total") or 0,
            "stored": metric_value(t, "fleetml_measurements_stored_total") or 0,
            "missing": metric_value(t, "fleetml_measurements_rejected_total",
                                    reason="missing_field") or 0,
            "malformed": metric_value(t, "fleetml_measurements_rejected_total",
                                      reason="malformed_json") or 0,
            "replies": metric_value(t, "fleetml_replies_total") or 0,
            "inference": metric_value(t, "fleetml_inference_seconds_count") or 0,
        }

    d = connected(platform, "dev-http")
    before = snapshot()
    for _ in range(2):
        m, _ = d.measure(make_measurement(unique_id("metric")))
        assert m.json()["status"] == "ok"
    bad = make_measurement(unique_id("metric-bad"))
    del bad["taken_at"]
    m, _ = d.measure(encode(bad), mid=bad["id"])
    assert m.json()["error"]["code"] == "missing_field"
    since = d.mark()
    d.publish(b"{not json")
    d.wait_message(lambda x: x.json()["error"]["code"] == "malformed_json", 5, since)

    want = {"received": 4, "stored": 2, "missing": 1, "malformed": 1, "replies": 4,
            "inference": 2}

    def moved():
        now = snapshot()
        return all(now[k] - before[k] >= v for k, v in want.items()) and now
    try:
        wait_for(moved, 5, msg="metrics to count the measurements")
    except AssertionError:
        now = snapshot()
        raise AssertionError("metric deltas " + str({k: now[k] - before[k] for k in now})
                             + f" expected at least {want}") from None
    # The other tests run sequentially, so nothing else moved the counters:
    # exact deltas catch double counting.
    now = snapshot()
    assert now["stored"] - before["stored"] == 2, (before, now)
    assert now["missing"] - before["missing"] == 1, (before, now)
    assert now["received"] - before["received"] == 4, (before, now)


def test_unknown_path_404(platform):
    st, _ = platform.http("/no-such-endpoint")
    assert st == 404
