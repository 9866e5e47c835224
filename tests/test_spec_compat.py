"""Every path, method and request/response property of the original's 0.17.0 spec must exist
in ours with a compatible type, so clients generated from either spec work against us."""
import json

import pytest
import requests

from conftest import ORIGINAL_SPEC


def resolve(spec, schema):
    while isinstance(schema, dict) and "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        schema = spec["components"]["schemas"][name]
    return schema


def alternatives(spec, schema):
    """The non-null alternatives of a schema, with refs resolved and anyOf/oneOf flattened."""
    schema = resolve(spec, schema)
    alts = schema.get("anyOf") or schema.get("oneOf")
    if alts:
        out = []
        for a in alts:
            out += alternatives(spec, a)
        return out
    if schema.get("type") == "null":
        return []
    return [schema]


def kind(spec, schema):
    t = schema.get("type")
    if t == "array":
        return ("array", tuple(sorted({kind(spec, a) for a in alternatives(spec, schema.get("items", {}))})))
    if t is None and ("properties" in schema or "additionalProperties" in schema):
        return ("object",)
    if t is None:
        return ("any",)
    return (t,)


def compatible(theirs, ours):
    if ours == ("any",):
        return True
    if theirs[0] != ours[0]:
        # An integer field may be described as number on our side, never the reverse.
        return theirs == ("integer",) and ours == ("number",)
    if theirs[0] == "array":
        return all(any(compatible(t, o) for o in ours[1]) for t in theirs[1]) or not theirs[1]
    return True


def properties(spec, schema):
    props = {}
    for alt in alternatives(spec, schema):
        for name, p in alt.get("properties", {}).items():
            props.setdefault(name, []).extend(alternatives(spec, p))
    return props


def check_schema(where, theirs_spec, theirs, ours_spec, ours, problems):
    t_props, o_props = properties(theirs_spec, theirs), properties(ours_spec, ours)
    for name, t_alts in t_props.items():
        if name not in o_props:
            problems.append(f"{where}: property '{name}' missing")
            continue
        o_kinds = {kind(ours_spec, a) for a in o_props[name]}
        for ta in t_alts:
            tk = kind(theirs_spec, ta)
            if not any(compatible(tk, ok) for ok in o_kinds):
                problems.append(f"{where}.{name}: theirs {tk} vs ours {sorted(o_kinds)}")
            if tk[0] == "object" and ta.get("properties"):
                o_objs = [a for a in o_props[name] if kind(ours_spec, a)[0] == "object"]
                if o_objs:
                    check_schema(f"{where}.{name}", theirs_spec, ta, ours_spec, o_objs[0], problems)


def body_schema(op):
    content = op.get("requestBody", {}).get("content", {})
    for ct, c in content.items():
        if "json" in ct:
            return c["schema"]
    return None


def response_schema(op, code):
    content = op.get("responses", {}).get(code, {}).get("content", {})
    for ct, c in content.items():
        if "json" in ct:
            return c.get("schema")
    return None


@pytest.fixture(scope="module")
def specs(server):
    path = ORIGINAL_SPEC
    assert path.exists(), (f"original spec not found at {path}: tests/run.sh dumps it from "
                           "cyborgdb-service==0.17.0 (or set SEALDB_ORIGINAL_SPEC)")
    theirs = json.loads(path.read_text())
    assert theirs["info"]["version"] == "0.17.0", theirs["info"]
    return theirs, requests.get(server.url + "/v1/openapi.json").json()


def test_every_path_method_and_property_is_compatible(specs):
    theirs, ours = specs
    problems = problems_between(theirs, ours)
    assert not problems, "\n".join(problems)


def test_every_declared_error_is_an_error_body(specs):
    _, ours = specs
    for path, methods in ours["paths"].items():
        for method, op in methods.items():
            for code, resp in op["responses"].items():
                if code.startswith(("4", "5")):
                    schema = response_schema(op, code)
                    assert schema and schema["$ref"].endswith("/ErrorResponseModel"), (path, method, code)
    err = ours["components"]["schemas"]["ErrorResponseModel"]
    assert sorted(err["required"]) == ["detail", "status_code"]


def problems_between(theirs, ours):
    """Everything of `theirs` (paths, methods, request bodies, parameters, 2xx bodies) that
    `ours` lacks or types incompatibly."""
    problems = []
    for path, methods in theirs["paths"].items():
        for method, op in methods.items():
            where = f"{method.upper()} {path}"
            mine = ours["paths"].get(path, {}).get(method)
            if mine is None:
                problems.append(f"{where}: missing")
                continue
            tb, ob = body_schema(op), body_schema(mine)
            if tb is not None:
                if ob is None:
                    problems.append(f"{where}: request body missing")
                else:
                    check_schema(f"{where} request", theirs, tb, ours, ob, problems)
            t_params = {(p["name"].lower(), p["in"]) for p in op.get("parameters", [])}
            o_params = {(p["name"].lower(), p["in"]) for p in mine.get("parameters", [])}
            for p in t_params - o_params:
                problems.append(f"{where}: parameter {p} missing")
            for code in op.get("responses", {}):
                if not code.startswith("2"):
                    continue
                if code not in mine.get("responses", {}):
                    problems.append(f"{where}: response {code} missing")
                    continue
                ts, os_ = response_schema(op, code), response_schema(mine, code)
                if ts is not None and os_ is not None:
                    check_schema(f"{where} {code}", theirs, ts, ours, os_, problems)
    return problems


def test_checker_catches_a_missing_property_and_a_wrong_type(specs):
    """The compatibility check itself must be able to fail."""
    import copy
    theirs, ours = specs
    assert problems_between(theirs, ours) == []
    broken = copy.deepcopy(ours)
    del broken["components"]["schemas"]["GetRequest"]["properties"]["include"]
    broken["components"]["schemas"]["DeleteRequest"]["properties"]["ids"] = {"type": "string"}
    del broken["paths"]["/v1/indexes/train"]
    found = "\n".join(problems_between(theirs, broken))
    assert "GetRequest" not in found  # reported by path, not schema name
    assert "/v1/vectors/get request: property 'include' missing" in found
    assert "/v1/vectors/delete request.ids" in found
    assert "POST /v1/indexes/train: missing" in found
