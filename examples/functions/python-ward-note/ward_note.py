#!/usr/bin/python3
"""A fleetml function in Python (docs/functions.md): turns a result into the
note a ward's system expects. Protocol: a ready line, then one JSON event per
line on stdin and one JSON answer per line on stdout. Only the standard
library: the sandbox has no network and a read-only file system."""
import json
import os
import sys

WARD = os.environ.get("WARD", "unknown")


def answer(obj):
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


answer({"ready": True})
for line in sys.stdin:
    req = json.loads(line)
    event = req.get("event") or {}
    data = event.get("data", event)
    outputs = data.get("outputs", {})
    if "hematocrit_pct" not in outputs:
        answer({"id": req.get("id"), "error": "the event has no hematocrit_pct"})
        continue
    answer({"id": req.get("id"), "result": {
        "ward": WARD,
        "device": data.get("device"),
        "measurement": data.get("measurement_id"),
        "text": "Hct %.1f %% (model %s)" % (outputs["hematocrit_pct"], data.get("model")),
    }})
