"""A throwaway PostgreSQL 15 server on loopback for the tests.

PostgreSQL refuses to run as root, so the server runs as the `postgres`
user (runuser) in a temporary directory it owns, on a free port, with its
Unix socket in that directory; trust authentication on 127.0.0.1 only.
stop() shuts it down fast and removes the directory.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from helpers import free_ports

BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(*args, check=True, timeout=60):
    cmd = ["runuser", "-u", "postgres", "--", *map(str, args)] if os.getuid() == 0 else \
        list(map(str, args))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check)


class PgServer:
    def __init__(self, dbname="fleetml"):
        self.dbname = dbname
        self.port = free_ports(1)[0]
        self.dir = Path(tempfile.mkdtemp(prefix="fleetml-pg-", dir="/tmp"))
        self.started = False

    @property
    def url(self):
        return f"postgres://postgres@127.0.0.1:{self.port}/{self.dbname}"

    def start(self):
        if not (BIN / "initdb").exists():
            raise AssertionError(f"{BIN}/initdb missing: run scripts/install-deps")
        if os.getuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        data = self.dir / "data"
        _as_postgres(BIN / "initdb", "-D", data, "-A", "trust", "-U", "postgres",
                     "--no-sync", "-E", "UTF8", "--locale", "C")
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                f"-c max_connections=200 -c shared_buffers=64MB")
        _as_postgres(BIN / "pg_ctl", "-D", data, "-l", self.dir / "log", "-o", opts, "-w",
                     "-t", "60", "start")
        self.started = True
        _as_postgres(BIN / "createdb", "-h", "127.0.0.1", "-p", self.port, "-U", "postgres",
                     self.dbname)
        return self

    def restart(self):
        """Stops and starts the server (connections are cut)."""
        data = self.dir / "data"
        _as_postgres(BIN / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                f"-c max_connections=200 -c shared_buffers=64MB")
        _as_postgres(BIN / "pg_ctl", "-D", data, "-l", self.dir / "log", "-o", opts, "-w",
                     "-t", "60", "start")

    def psql(self, sql):
        r = _as_postgres(BIN / "psql", "-h", "127.0.0.1", "-p", self.port, "-U", "postgres",
                         "-d", self.dbname, "-At", "-v", "ON_ERROR_STOP=1", "-c", sql)
        return r.stdout

    def stop(self):
        if self.started:
            _as_postgres(BIN / "pg_ctl", "-D", self.dir / "data", "-m", "immediate", "-w",
                         "stop", check=False)
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)
