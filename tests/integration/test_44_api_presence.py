"""Device presence as the HTTP API shows it (GET /api/v1/devices/{id}):
session takeover is not a disconnect, and a broker that dies takes every
device offline even though no disconnect report can come from it."""

import os
import signal

from api_client import Api, Users
from helpers import Device, pid_alive, wait_for

DEVS = ["pr-takeover", "pr-gone", "pr-back"]


def online(api, token, device_id):
    return api.ok("GET", f"/devices/{device_id}", token)["online"]


def wait_online(api, token, device_id, want, timeout=10):
    wait_for(lambda: online(api, token, device_id) is want, timeout, interval=0.1,
             msg=f"{device_id} online={want}")


def test_presence_takeover_and_broker_death(make_platform):
    p = make_platform(devices=DEVS, name="presence")
    api = Api(p)
    users = Users(api)
    users.add("admin", p.admin_password)
    tok = users.token("admin")

    # A second connection with the same client id takes the session over:
    # the first connection ends, but the device is still connected.
    first = Device(p, "pr-takeover").connect()
    wait_online(api, tok, "pr-takeover", True)
    second = Device(p, "pr-takeover").connect()
    first.wait_lost(10)
    # The takeover's end of the first connection must not flip it offline;
    # a later report (the second connection closing) must.
    probe = Device(p, "pr-gone").connect()   # a report that is processed after
    wait_online(api, tok, "pr-gone", True)
    assert online(api, tok, "pr-takeover") is True
    second.close()
    wait_online(api, tok, "pr-takeover", False)
    first.close()

    # Broker death: pr-gone does not reconnect, pr-back does.
    back = Device(p, "pr-back", reconnect=True).connect()
    wait_online(api, tok, "pr-back", True)
    connacks = len(back.connacks)
    old = p.healthz()["broker_pid"]
    os.kill(old, signal.SIGKILL)

    def new_pid():
        pid = p.healthz().get("broker_pid")
        return pid if isinstance(pid, int) and pid != old and pid_alive(pid) else None
    p.broker_pids.add(wait_for(new_pid, 20, interval=0.1, msg="a restarted broker"))
    wait_online(api, tok, "pr-gone", False, timeout=15)
    back.wait_connected(20, after=connacks)
    wait_online(api, tok, "pr-back", True, timeout=15)
    d = api.ok("GET", "/devices/pr-gone", tok)
    assert d["last_seen"] is not None, d
    probe.close()
    back.close()
