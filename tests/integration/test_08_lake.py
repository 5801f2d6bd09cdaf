"""Lake export while serving: committed measurements and quarantined
payloads show up as gzip NDJSON objects (lake.roll_seconds = 1)."""

import json

from helpers import TENANT, check_lake_layout, encode, make_measurement, unique_id, wait_for


def test_measurement_and_rejection_reach_the_lake(platform, connected):
    d = connected(platform, "dev-lake")
    doc = make_measurement(unique_id("lake"))
    reply, _ = d.measure(doc)
    reply = reply.json()
    assert reply["status"] == "ok", reply
    bad = make_measurement(unique_id("lake-bad"))
    bad["temperature_c"] = "warm"
    err, _ = d.measure(encode(bad), mid=bad["id"])
    assert err.json()["status"] == "error"

    def exported():
        return [r for _, r in platform.lake_records("raw")
                if r.get("device_id") == d.device_id and r.get("measurement_id") == doc["id"]]
    recs = wait_for(exported, 15, interval=0.2, msg="the measurement in lake/raw")
    assert len(recs) == 1, recs
    rec = recs[0]
    assert rec["tenant"] == TENANT
    assert rec["measurement"] == json.loads(encode(doc)), "lake measurement differs from sent"
    assert rec["model"] == reply["model"]
    assert rec["result"].get("outputs") == reply["outputs"], (rec["result"], reply)
    assert not [r for _, r in platform.lake_records("raw")
                if r.get("measurement_id") == bad["id"]], "rejected payload in lake/raw"
    check_lake_layout(platform)

    def quarantined():
        hits = []
        for _, r in platform.lake_records("quarantine"):
            if r.get("device_id") == d.device_id and bad["id"] in json.dumps(r):
                hits.append(r)
        return hits
    q = wait_for(quarantined, 15, interval=0.2, msg="the rejected payload in lake/quarantine")
    assert len(q) == 1, q
    assert "invalid_type" in json.dumps(q[0]), q[0]
