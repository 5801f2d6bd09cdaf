"""The command line: help from one table per command, in every form (help,
--help, the man page, bash completion); options outside the tables refused;
scriptable --json output; `fleetml status` against a running node.

FLEETML_CLI_STRICT (conftest.py) makes every fleetml the suite runs abort
when a parser asks for an option its table does not list; the static check
below covers the other direction (every listed option is parsed)."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import Device, make_measurement, unique_id

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "src" / "cli"


def run_on_tty(cmd, timeout=60):
    """Runs cmd with a pseudo-terminal as stdin, stdout and stderr; returns
    what it wrote."""
    import pty
    import select
    import time
    pid, fd = pty.fork()
    if pid == 0:  # the child
        os.chdir(ROOT)
        os.execv(cmd[0], [str(c) for c in cmd])
    out, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, out)
    return out.decode(errors="replace")


def run(fm_bin, *args, data=None, check=None, stdin=None, cwd=None):
    cmd = [fm_bin, *args] + (["--data", str(data)] if data else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, input=stdin,
                       cwd=cwd or ROOT)
    if check is not None:
        assert r.returncode == check, (cmd, r.returncode, r.stdout, r.stderr)
    return r


@pytest.fixture(scope="module")
def table(fm_bin):
    return json.loads(run(fm_bin, "help", "--json", check=0).stdout)


@pytest.fixture(scope="module")
def data(fm_bin, tmp_path_factory):
    """An initialised data directory with two devices, a template, a user."""
    d = tmp_path_factory.mktemp("cli") / "data"
    run(fm_bin, "init", data=d, check=0)
    for dev in ("cli-dev-1", "cli-dev-2"):
        run(fm_bin, "device", "add", dev, "--group", "icu", data=d, check=0)
    run(fm_bin, "template", "add", "cli-ward", "--serials", "SN-1,SN-2", data=d, check=0)
    run(fm_bin, "user", "add", "cli-clin", "--tenant", "demo-hospital", "--roles", "clinician",
        data=d, check=0)
    return d


def test_every_command_answers_help_the_same_way(fm_bin, table):
    assert {c["group"] for c in table} >= {"init", "serve", "status", "device", "template",
                                          "user", "sim", "model", "lake", "rules", "function",
                                          "api", "bench", "features"}
    for c in table:
        words = c["name"].split()
        via_help = run(fm_bin, "help", *words, check=0).stdout
        via_flag = run(fm_bin, *words, "--help", check=0).stdout
        via_h = run(fm_bin, *words, "-h", check=0).stdout
        assert via_help == via_flag == via_h, c["name"]
        assert via_help.startswith(f"fleetml {c['name']} - {c['summary']}"), via_help
        assert "exit status: 0 done, 1 failed, 2 usage error" in via_help
        if c["runs"]:
            assert "usage: fleetml " + c["name"] in via_help
            for o in c["options"]:
                assert o["name"] in via_help and o["help"] in via_help, (c["name"], o)
            for ex in c["examples"]:
                assert ex in via_help
        else:  # a group lists its subcommands
            for s in table:
                if s["group"] == c["group"] and s["name"] != c["name"] and not s["hidden"]:
                    assert s["name"].split()[-1] in via_help, (c["name"], s["name"])
    # Every command has an example, and an example uses only its options.
    import shlex
    for c in table:
        if not c["runs"]:
            continue
        assert c["examples"], c["name"]
        names = {o["name"]: o for o in c["options"]} | {"--help": {"arg": None}}
        for ex in c["examples"]:
            seg = next(x for x in ex.split("|") if x.strip().startswith("fleetml "))
            words = shlex.split(seg)[1:]
            assert words[:len(c["name"].split())] == c["name"].split(), ex
            rest, i = words[len(c["name"].split()):], 0
            while i < len(rest):
                w = rest[i]
                if w.startswith("-") and len(w) > 1 and not w[1].isdigit():
                    assert w in names, (ex, w)
                    i += 2 if names[w]["arg"] else 1
                else:
                    i += 1
    top = run(fm_bin, "help", check=0).stdout
    assert run(fm_bin, "--help", check=0).stdout == top
    for g in {c["group"] for c in table}:
        assert f"\n  {g} " in top, g


def test_unknown_commands_and_options_are_usage_errors(fm_bin):
    r = run(fm_bin, "device", "add", "cli-x", "--bogus", "1", check=2)
    assert "unknown option '--bogus'" in r.stderr and "fleetml help device add" in r.stderr
    r = run(fm_bin, "device", "frobnicate", check=2)
    assert "unknown subcommand 'frobnicate'" in r.stderr and "fleetml help device" in r.stderr
    r = run(fm_bin, "nope", check=2)
    assert "unknown command 'nope'" in r.stderr
    r = run(fm_bin, "help", "device", "nope", check=2)
    assert "no such command" in r.stderr
    r = run(fm_bin, "device", check=2)  # a group alone: its subcommands, on stderr
    assert "subcommands:" in r.stderr and "show" in r.stderr
    r = run(fm_bin, "template", "add", "cli-y", "--tenant", check=2)
    assert "option '--tenant' needs a value" in r.stderr
    # An option of another subcommand is not this one's.
    r = run(fm_bin, "device", "disable", "cli-x", "--desired", "{}", check=2)
    assert "unknown option '--desired'" in r.stderr
    assert run(fm_bin, check=2).stderr.startswith("fleetml ")


def _parsed_options(path):
    """Option names a C file parses: fm_cli_take_opt/flag literals and
    argv comparisons with option literals."""
    text = path.read_text()
    got = set(re.findall(r'fm_cli_take_(?:opt|flag)\([^"]*"(-[-\w]+)"', text))
    got |= set(re.findall(r'strcmp\(argv\[\w+(?: [+-] \d+)?\], "(-[-\w]+)"\)', text))
    return got - {"--help", "-h", "--data", "--set"}


def test_option_tables_match_the_parsers(table):
    """Each command group's table lists exactly the options its source
    files parse."""
    files_of = {}
    for f in CLI.glob("cmd_*.c"):
        text = f.read_text()
        for g in re.findall(r"const fm_cli_cmd fm_cli_(\w+)_cmds\[\]", text):
            files_of.setdefault(g, set()).add(f)
        for g in re.findall(r"^int fm_cmd_([a-z]+)\w*\(", text, re.M):
            files_of.setdefault(g, set()).add(f)
    groups = {c["group"] for c in table}
    for g in groups:
        assert g in files_of, g
        listed = {o["name"] for c in table if c["group"] == g for o in c["options"]}
        listed -= {"--data", "--set"}
        parsed = set()
        for f in files_of[g]:
            parsed |= _parsed_options(f)
        # A file shared by two groups (rules, function) parses both groups'.
        shared = {o["name"] for c in table if c["group"] != g and
                  any(f in files_of.get(c["group"], ()) for f in files_of[g])
                  for o in c["options"]}
        assert listed <= parsed, (g, "listed but never parsed", listed - parsed)
        assert parsed <= listed | shared, (g, "parsed but not listed", parsed - listed - shared)


def test_man_page_builds_and_renders(fm_bin, table):
    page = Path(fm_bin).parent / "fleetml.1"
    assert page.exists(), "the build generates the man page"
    assert page.read_text() == run(fm_bin, "help", "--man", check=0).stdout
    warn = subprocess.run(["groff", "-ww", "-z", "-man", str(page)], capture_output=True,
                          text=True)
    assert warn.returncode == 0 and warn.stderr == "", warn.stderr
    env = dict(os.environ, MANWIDTH="100", MAN_KEEP_FORMATTING="0")
    out = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    text = re.sub(r".\x08", "", out.stdout)
    assert "FLEETML(1)" in text and "EXIT STATUS" in text
    for c in table:
        if c["runs"] and not c["hidden"]:
            assert "fleetml " + c["name"] in text, c["name"]


def test_bash_completion_completes_commands_options_and_ids(fm_bin, data):
    script = Path(fm_bin).parent / "fleetml.bash"
    assert script.read_text() == run(fm_bin, "help", "--completion", check=0).stdout
    probe = f"""
source {script}
complete_at() {{ COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); _fleetml; echo "${{COMPREPLY[*]}}"; }}
complete_at fleetml dev
complete_at fleetml device sh
complete_at fleetml device show --data {data} cli-dev-
complete_at fleetml template enable --data {data} cli-
complete_at fleetml device add x --te
complete_at fleetml help mod
"""
    r = subprocess.run(["bash", "--norc", "-c", probe], capture_output=True, text=True,
                       env=dict(os.environ, PATH=f"{Path(fm_bin).parent}:{os.environ['PATH']}"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "device"
    assert lines[1] == "show shadow"
    assert lines[2].split() == ["cli-dev-1", "cli-dev-2"]
    assert lines[3] == "cli-ward"
    assert lines[4] == "--tenant"
    assert lines[5] == "model"


def test_json_output_of_lists_and_shows(fm_bin, data):
    def j(*args):
        return json.loads(run(fm_bin, *args, data=data, check=0).stdout)

    devs = j("device", "list", "--json")["items"]
    assert [d["id"] for d in devs] == ["cli-dev-1", "cli-dev-2"]
    for d in devs:
        assert set(d) == {"id", "tenant", "status", "group", "serial_number", "model",
                          "firmware", "created_at", "online", "last_seen", "cert_expires_at"}
        assert d["group"] == "icu" and d["online"] is False and d["status"] == "active"
    assert run(fm_bin, "device", "list", "-q", data=data, check=0).stdout.split() == \
        ["cli-dev-1", "cli-dev-2"]
    one = j("device", "show", "cli-dev-1", "--json")
    assert one["id"] == "cli-dev-1" and one["certificates"][0]["status"] == "active"
    assert one["shadow"] is None
    run(fm_bin, "device", "shadow", "cli-dev-1", "--desired", '{"interval_s": 30}', data=data,
        check=0)
    assert j("device", "show", "cli-dev-1", "--json")["shadow"]["state"]["desired"] == \
        {"interval_s": 30}
    assert run(fm_bin, "device", "show", "cli-nope", data=data, check=1).stderr
    tpl = j("template", "list", "--json")["items"]
    assert [t["name"] for t in tpl] == ["cli-ward"] and tpl[0]["has_allowlist"] is True
    assert run(fm_bin, "template", "list", "-q", data=data, check=0).stdout.split() == \
        ["cli-ward"]
    users = {u["username"]: u for u in j("user", "list", "--json")["items"]}
    assert users["cli-clin"]["roles"] == ["clinician"] and users["cli-clin"]["mfa"] is False
    assert "password" not in json.dumps(users)
    assert j("rules", "list", "--json") == {"items": []}
    assert j("model", "versions", "--json") == {"versions": [], "deployments": []}
    routes = json.loads(run(fm_bin, "api", "routes", "--json", check=0).stdout)
    assert {"method": "GET", "path": "/api/v1/devices", "permission": "devices.read"} in routes
    info = json.loads(run(fm_bin, "model", "info", "--json", check=0).stdout)
    assert info["name"] and info["version"] and len(info["features"]) > 5
    assert {o["name"] for o in info["outputs"]} >= {"hematocrit_pct"}
    # --json and -q exclude each other.
    run(fm_bin, "device", "list", "--json", "-q", data=data, check=2)


def test_status_of_a_running_node(fm_bin, module_platform):
    p = module_platform("clistat", devices=["stat-1", "stat-2"])
    d = Device(p, "stat-1")
    try:
        d.connect()
        d.subscribe(d.results_topic)
        m, _ = d.measure(make_measurement(unique_id()), timeout=15)
        assert m.json()["status"] == "ok"

        def status():
            return json.loads(p.cli("status", "--json").stdout)
        from helpers import wait_for
        wait_for(lambda: status()["devices"]["demo-hospital"]["online"] >= 1, 20,
                 msg="the device online in status")
        s = status()
        assert s["node"] == "it-clistat" and s["broker"]["up"] is True
        assert s["broker"]["devices_connected"] >= 1 and s["broker"]["pid"] > 0
        assert s["devices"]["demo-hospital"]["online"] + \
            s["devices"]["demo-hospital"]["offline"] >= 2
        assert s["pipeline"]["replied"] >= 1 and s["pipeline"]["commit_failures"] == 0
        rm = s["pipeline"]["reply_ms"]
        assert 0 < rm["p50"] <= rm["max_since_start"] and rm["window_s"] >= 0, rm
        assert s["model"]["serving"].startswith("viscosity@")
        certs = {c["name"]: c for c in s["certificates"]}
        assert set(certs) == {"ca", "broker", "service"}
        assert all(c["days_left"] > 30 and c["warn"] is False for c in certs.values()), certs
        text = p.cli("status").stdout
        assert "demo-hospital:" in text and "online" in text and "certs" in text
    finally:
        d.close()
    # Progress: a line redrawn on a terminal, nothing when output is a pipe.
    sim = ["sim", "--devices", "2", "--rate", "2", "--duration", "2", "--provision",
           "--prefix", "stat-sim", "--data", str(p.data)]
    on_tty = run_on_tty([fm_bin, *sim])
    assert "devices connected" in on_tty and "100%" in on_tty, on_tty
    piped = run(fm_bin, *sim, check=0)
    assert "devices connected" not in piped.stdout + piped.stderr
    assert "ok=" in piped.stdout
    # No node: a clear failure, exit 1.
    r = run(fm_bin, "status", "--url", "http://127.0.0.1:9", check=1)
    assert "no node answers" in r.stderr


def test_bench_pipeline_reports_its_figures(fm_bin, tmp_path):
    """`fleetml bench pipeline` (what `make bench` reads) answers every
    measurement and reports each cost it claims to measure."""
    out = subprocess.run([fm_bin, "bench", "pipeline", "--n", "400", "--data", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads([l for l in out.stdout.splitlines() if l.startswith("{")][-1])
    assert doc["measurements"] == 400 and doc["ok"] == 400
    # The unmeasured warm-up pass defaults to the measured pass's size.
    assert doc["warmup"] == 400, doc
    for k in ("cpu_us_per_measurement", "parse_validate_us", "features_us",
              "predict_one_row_us"):
        assert doc[k] > 0, (k, doc)
    assert "lone" not in doc
    out = subprocess.run([fm_bin, "bench", "pipeline", "--n", "150", "--warmup", "0",
                          "--lone", "7", "--data", str(tmp_path / "cold")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads([l for l in out.stdout.splitlines() if l.startswith("{")][-1])
    assert doc["measurements"] == 150 and doc["warmup"] == 0 and doc["ok"] == 150, doc
    # Lone measurements, each answered before the next is sent.
    lone = doc["lone"]
    assert lone["n"] == 7 and lone["gap_ms"] > 0, lone
    assert 0 < lone["reply_us"]["p50"] <= lone["reply_us"]["p90"] <= lone["reply_us"]["max"]
    bad = subprocess.run([fm_bin, "bench", "pipeline", "--n", "10", "--warmup", "x",
                          "--data", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--warmup" in bad.stderr
