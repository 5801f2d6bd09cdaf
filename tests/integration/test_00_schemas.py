"""The published JSON Schemas of device contract v1 (docs/schemas/).

These tests need no running platform. The structural checks use only the
standard library; when Debian's python3-jsonschema is installed the schemas
are also checked against the draft 2020-12 meta-schema and used to validate
good and bad example documents.
"""

import copy
import json
import os

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCHEMA_DIR = os.path.join(ROOT, "docs", "schemas")
DRAFT = "https://json-schema.org/draft/2020-12/schema"

MEASUREMENT_REQUIRED = ["id", "taken_at", "kind", "temperature_c", "sweep", "firmware"]
ERROR_CODES = {
    "malformed_json", "payload_too_large", "missing_field", "invalid_type", "invalid_value",
    "out_of_range", "unknown_field", "unknown_kind", "unknown_device", "device_inactive",
    "unavailable", "rate_limited", "internal",
}

try:
    import jsonschema  # Debian: python3-jsonschema
except ImportError:  # pragma: no cover - depends on the host
    jsonschema = None

needs_jsonschema = pytest.mark.skipif(jsonschema is None,
                                      reason="python3-jsonschema is not installed")


def load(name):
    with open(os.path.join(SCHEMA_DIR, name), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def measurement_schema():
    return load("measurement.v1.json")


@pytest.fixture(scope="module")
def result_schema():
    return load("result.v1.json")


# --------------------------------------------------------------------------
# Structure (standard library only)


@pytest.mark.parametrize("name", ["measurement.v1.json", "result.v1.json"])
def test_schema_is_json_with_draft(name):
    s = load(name)
    assert isinstance(s, dict)
    assert s.get("$schema") == DRAFT
    assert s.get("$id", "").startswith("urn:fleetml:schema:")
    assert s.get("title") and s.get("description")
    assert isinstance(s.get("examples"), list) and s["examples"], "schemas carry examples"


def test_measurement_required_fields(measurement_schema):
    s = measurement_schema
    assert s["type"] == "object"
    assert s["additionalProperties"] is False, "contract v1 is strict"
    assert sorted(s["required"]) == sorted(MEASUREMENT_REQUIRED)
    props = s["properties"]
    assert set(props) == set(MEASUREMENT_REQUIRED) | {"meta"}
    assert props["kind"] == {"description": props["kind"]["description"],
                             "const": "viscosity.sweep.v1"}
    assert props["temperature_c"]["minimum"] == 10 and props["temperature_c"]["maximum"] == 45
    assert props["sweep"]["minItems"] == 2 and props["sweep"]["maxItems"] == 64
    assert props["id"]["maxLength"] == 64 and props["firmware"]["maxLength"] == 64
    step = s["$defs"]["step"]
    assert step["additionalProperties"] is False
    assert sorted(step["required"]) == ["samples", "shear_rate_s"]
    samples = step["properties"]["samples"]
    assert samples["minItems"] == 3 and samples["maxItems"] == 4096
    assert samples["items"]["maximum"] == 1e6 and samples["items"]["minimum"] == -1e6
    rate = step["properties"]["shear_rate_s"]
    assert rate["minimum"] == 0.01 and rate["maximum"] == 5000


def test_result_required_fields(result_schema):
    defs = result_schema["$defs"]
    assert [b["$ref"] for b in result_schema["oneOf"]] == ["#/$defs/ok", "#/$defs/error"]
    ok = defs["ok"]
    assert sorted(ok["required"]) == sorted(["id", "status", "model", "outputs", "received_at"])
    assert ok["properties"]["status"]["const"] == "ok"
    assert sorted(ok["properties"]["outputs"]["required"]) == sorted(
        ["viscosity_high_mpas", "viscosity_low_mpas", "hematocrit_pct"])
    err = defs["error"]
    assert sorted(err["required"]) == ["error", "id", "status"]
    assert err["properties"]["status"]["const"] == "error"
    e = err["properties"]["error"]
    assert sorted(e["required"]) == ["code", "message"]
    assert set(e["properties"]["code"]["enum"]) == ERROR_CODES


def test_examples_have_required_fields(measurement_schema, result_schema):
    for ex in measurement_schema["examples"]:
        for k in MEASUREMENT_REQUIRED:
            assert k in ex, k
    for ex in result_schema["examples"]:
        branch = result_schema["$defs"][ex["status"]]
        for k in branch["required"]:
            assert k in ex, k


def test_protocol_doc_links_schemas():
    with open(os.path.join(ROOT, "docs", "protocol.md"), encoding="utf-8") as f:
        doc = f.read()
    for name in ("schemas/measurement.v1.json", "schemas/result.v1.json"):
        assert name in doc, f"protocol.md does not link {name}"
    for code in ERROR_CODES:
        assert f"`{code}`" in doc, f"protocol.md does not document {code}"


# --------------------------------------------------------------------------
# Validation (only with python3-jsonschema)


def validator(schema):
    cls = getattr(jsonschema, "Draft202012Validator", None)
    if cls is None:
        pytest.skip("this jsonschema has no draft 2020-12 support")
    cls.check_schema(schema)
    return cls(schema, format_checker=getattr(cls, "FORMAT_CHECKER", None))


@needs_jsonschema
def test_examples_validate(measurement_schema, result_schema):
    for schema in (measurement_schema, result_schema):
        v = validator(schema)
        for ex in schema["examples"]:
            errors = list(v.iter_errors(ex))
            assert not errors, [e.message for e in errors]


def _bad_measurements(good):
    def with_(path, value=None, delete=False):
        d = copy.deepcopy(good)
        cur = d
        for p in path[:-1]:
            cur = cur[p]
        if delete:
            del cur[path[-1]]
        else:
            cur[path[-1]] = value
        return d

    return {
        "missing id": with_(["id"], delete=True),
        "id charset": with_(["id"], "a/b"),
        "id too long": with_(["id"], "x" * 65),
        "wrong kind": with_(["kind"], "viscosity.sweep.v2"),
        "temperature type": with_(["temperature_c"], "37"),
        "temperature range": with_(["temperature_c"], 80),
        "unknown field": with_(["colour"], "red"),
        "one step": with_(["sweep"], good["sweep"][:1]),
        "step extra": with_(["sweep", 0, "extra"], 1),
        "shear range": with_(["sweep", 0, "shear_rate_s"], 0),
        "two samples": with_(["sweep", 1, "samples"], [1, 2]),
        "sample type": with_(["sweep", 1, "samples", 0], "x"),
        "sample range": with_(["sweep", 1, "samples", 0], 2e6),
        "firmware control": with_(["firmware"], "fw\n1"),
        "meta type": with_(["meta"], []),
    }


@needs_jsonschema
def test_bad_measurements_rejected(measurement_schema):
    v = validator(measurement_schema)
    good = measurement_schema["examples"][0]
    for what, doc in _bad_measurements(good).items():
        assert list(v.iter_errors(doc)), f"schema accepted: {what}"


@needs_jsonschema
def test_bad_results_rejected(result_schema):
    v = validator(result_schema)
    ok, err = result_schema["examples"][0], result_schema["examples"][1]
    bad = []
    d = copy.deepcopy(ok)
    del d["outputs"]["hematocrit_pct"]
    bad.append(d)
    d = copy.deepcopy(ok)
    d["model"] = "viscosity"
    bad.append(d)
    d = copy.deepcopy(ok)
    d["status"] = "fine"
    bad.append(d)
    d = copy.deepcopy(err)
    d["error"]["code"] = "teapot"
    bad.append(d)
    d = copy.deepcopy(err)
    del d["error"]["message"]
    bad.append(d)
    for doc in bad:
        assert list(v.iter_errors(doc)), f"schema accepted: {doc}"
