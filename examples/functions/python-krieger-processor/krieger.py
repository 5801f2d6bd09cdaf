#!/usr/bin/python3
"""A processor function (docs/functions.md, "Functions in the reply path"):
answers a device's measurement instead of the bundled model, from the
features fleetml extracted. A textbook estimate, not a clinical model:

- viscosity at 300 1/s and at 1 1/s: the sweep's own values at 37 C
  (features log_visc_300_37c and log_visc_1_37c, ln of mPa*s);
- hematocrit from the Krieger-Dougherty relation for suspensions,
  eta = eta_plasma * (1 - phi/phi_max) ** -(k * phi_max), inverted at high
  shear with eta_plasma = PLASMA_MPAS, phi_max = 0.8, k * phi_max = 2.

Answers an error for a measurement whose id starts with "fail-" (so the
platform's handling of a failing processor can be tried)."""
import json
import math
import os
import sys

PLASMA = float(os.environ.get("PLASMA_MPAS", "1.2"))
PHI_MAX = 0.8


def answer(obj):
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


answer({"ready": True})
for line in sys.stdin:
    req = json.loads(line)
    event = req["event"]
    f = event["features"]
    if str(event["measurement"].get("id", "")).startswith("fail-"):
        answer({"id": req["id"], "error": "refused on purpose"})
        continue
    high = math.exp(f["log_visc_300_37c"])
    low = math.exp(f["log_visc_1_37c"])
    ratio = min(1.0, PLASMA / high)
    hct = 100.0 * PHI_MAX * (1.0 - math.sqrt(ratio))
    answer({"id": req["id"], "result": {"outputs": {
        "viscosity_high_mpas": round(high, 4),
        "viscosity_low_mpas": round(low, 4),
        "hematocrit_pct": round(hct, 3),
    }}})
