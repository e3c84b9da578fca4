"""The HTTP API's contracts: the OpenAPI document, the body structs, the error mapping and the client.

The server tests start a real `hlpool serve` process on 127.0.0.1 (one worker,
two example guests); the rest check the modules directly.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import msgspec
import pytest
from test_server import CLEAN_ENV, HLPOOL, assert_stopped_cleanly, descendants, start_server

import hlpool
from hlpool import defaults, errors
from hlpool.service import schema
from hlpool.service.api_errors import ERROR_STATUS, ApiError, api_error
from hlpool.service.client import ERROR_CLASSES, Client, RemoteError, RemoteGuestFault, error_from_response
from hlpool.service.config import ServerConfig
from hlpool.service.openapi import openapi_document
from hlpool.service.routes import ROUTES

SOURCES = Path(hlpool.__file__).resolve().parent


@pytest.fixture(scope="module")
def server(kvm, tmp_path_factory, example):
    directory = tmp_path_factory.mktemp("service-api")
    srv = start_server(directory, "--guest", f"add={example('add')}", "--guest", f"faults={example('faults')}")
    helpers = descendants(srv.pid)
    yield srv
    helpers.update(descendants(srv.pid))
    assert_stopped_cleanly(srv, helpers)


# ---- a validator for the part of JSON Schema the document uses -------------------------------------------


def violations(value, schema: dict, doc: dict, at: str = "") -> list[str]:
    """Where ``value`` breaks ``schema`` (resolving the document's $refs): a list of field paths."""
    if "$ref" in schema:
        return violations(value, doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]], doc, at)
    if "anyOf" in schema or "oneOf" in schema:
        options = schema.get("anyOf") or schema["oneOf"]
        results = [violations(value, option, doc, at) for option in options]
        return [] if any(not r for r in results) else min(results, key=len)
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    kind = schema.get("type")
    if kind in ("number", "integer"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
            (kind == "number" or isinstance(value, int))
        if not ok or ("exclusiveMinimum" in schema and not value > schema["exclusiveMinimum"]):
            return [at or "$"]
    elif kind is not None and not isinstance(value, kinds[kind]):
        return [at or "$"]
    if "enum" in schema and value not in schema["enum"]:
        return [at or "$"]
    if "pattern" in schema and not re.search(schema["pattern"], value):
        return [at or "$"]
    out: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties", {})
        out += [f"{at}.{k}".lstrip(".") for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties") is False:
            out += [f"{at}.{k}".lstrip(".") for k in value if k not in props]
        for k, v in value.items():
            if k in props:
                out += violations(v, props[k], doc, f"{at}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            out += violations(v, schema["items"], doc, f"{at}[{i}]")
    return [o.lstrip(".") for o in out]


# ---- against a real server -----------------------------------------------------------------------------


def test_the_document_describes_every_route_of_the_app(server):
    from aiohttp import web

    from hlpool.service.app import make_app
    from hlpool.service.handlers import Service

    status, doc, _ = server.get("/openapi.json")
    assert status == 200
    app = make_app(Service(None, ServerConfig()))
    served = {(route.method.lower(), route.resource.canonical) for route in app.router.routes()
              if isinstance(route.resource, web.Resource)}
    documented = {(method, path) for path, operations in doc["paths"].items() for method in operations}
    assert served == documented == {(r.method.lower(), r.path) for r in ROUTES}
    # every $ref resolves, and every body struct of the routes is a component
    text = msgspec.json.encode(doc).decode()
    for name in re.findall(r'"\$ref":"#/components/schemas/(\w+)"', text):
        assert name in doc["components"]["schemas"], name
    for route in ROUTES:
        for body in (route.response, *route.request):
            if isinstance(body, type) and issubclass(body, msgspec.Struct):
                assert body.__name__ in doc["components"]["schemas"]
    # each documented error code is under the status the server answers it with
    for operation in (op for operations in doc["paths"].values() for op in operations.values()):
        for status_text, response in operation["responses"].items():
            if response["description"].startswith("error: "):
                for code in response["description"].removeprefix("error: ").split(", "):
                    assert ERROR_STATUS[code] == int(status_text), (operation["operationId"], code)
    assert openapi_document(ServerConfig())["paths"].keys() == doc["paths"].keys()


CALL_BODIES = [
    ({"args": [2, 40]}, []),
    ({"args": [2, 40], "timeout": 5}, []),
    ({"args": {"a": 1}}, ["args"]),
    ({"args": "x"}, ["args"]),
    ([1, 2], ["$"]),
    ({"args": [], "extra": 1}, ["extra"]),
    ({"args": [], "timeout": 0}, ["timeout"]),
    ({"args": [], "timeout": -1}, ["timeout"]),
    ({"args": [], "timeout": "soon"}, ["timeout"]),
    ({"args": [], "timeout": True}, ["timeout"]),
]

REGISTER_BODIES = [
    ({"name": "bad/name", "path": "/x.elf"}, ["name"]),
    ({"name": "x" * 65, "path": "/x.elf"}, ["name"]),
    ({"name": "x"}, ["path"]),
    ({"name": "x", "path": "/x", "more": 1}, ["more"]),
    ({"name": 7, "path": "/x"}, ["name"]),
    ({"name": "x", "language": "cobol", "source": ""}, ["language"]),
    ([1], ["$"]),
]


def test_a_malformed_body_gets_the_400_the_schema_predicts(server):
    status, doc, _ = server.get("/openapi.json")
    call = doc["paths"]["/v1/snapshots/{name}/calls/{function}"]["post"]
    call_schema = call["requestBody"]["content"]["application/json"]["schema"]
    register = doc["paths"]["/v1/snapshots"]["post"]
    register_schema = register["requestBody"]["content"]["application/json"]["schema"]
    cases = [("/v1/snapshots/add/calls/add", call_schema, body, fields) for body, fields in CALL_BODIES]
    cases += [("/v1/snapshots", register_schema, body, fields) for body, fields in REGISTER_BODIES]
    for path, body_schema, body, fields in cases:
        predicted = violations(body, body_schema, doc)
        assert sorted(predicted) == sorted(fields), (body, predicted)
        status, answer, _ = server.post(path, body)
        if not predicted:
            assert status == 200 and answer == {"result": 42}, (body, answer)
            continue
        assert status == 400 and answer["error"]["code"] == "bad_request", (body, answer)
        message = answer["error"]["message"]
        for field in fields:  # the message names the field the schema points at
            named = message.startswith("the body:") if field == "$" else \
                message.startswith(f"{field}:") or f"`{field}`" in message
            assert named, (body, message)
    for operation in (call, register):
        assert "bad_request" in operation["responses"]["400"]["description"]
    # the rules the types cannot say come from the structs too, with the field named first
    status, answer, _ = server.post("/v1/snapshots", {"name": "rel", "path": "twice.elf"})
    assert status == 400 and answer["error"]["message"].startswith("path must be absolute")
    status, answer, _ = server.post("/v1/snapshots/add/calls/add", {"args": [{"base64": "not base64!"}]})
    assert status == 400 and answer["error"]["message"].startswith("args: invalid base64")


def test_responses_match_their_structs(server):
    for route in ROUTES:
        if route.method != "GET" or "{" in route.path or route.response in (str, dict):
            continue
        status, body, _ = server.get(route.path)
        assert status == route.status, route.path
        msgspec.convert(body, route.response)  # raises if the body does not fit
    status, body, _ = server.get("/v1/snapshots/add")
    assert msgspec.to_builtins(msgspec.convert(body, schema.SnapshotInfo)) == body  # no field left undescribed
    status, body = server.call("faults", "null_deref")
    assert status == 502 and msgspec.convert(body, schema.Error).error.code == "guest_fault"


def test_a_remote_guest_fault_keeps_its_fields(server):
    status, body = server.call("faults", "null_deref")
    details = body["error"]["details"]
    assert set(details) == set(errors.GuestFault.FIELDS)
    with pytest.raises(hlpool.GuestFault) as info:
        Client(server.url).call("faults", "null_deref")
    fault = info.value
    assert isinstance(fault, RemoteGuestFault) and isinstance(fault, RemoteError)
    assert {name: getattr(fault, name) for name in errors.GuestFault.FIELDS} == details
    assert fault.vector == 14 and fault.address == 0 and fault.rip > 0 and "page fault" in fault.vector_name
    assert (fault.code, fault.status, fault.details) == ("guest_fault", 502, details)
    assert str(fault).startswith("guest_fault: ")
    again = errors.from_wire(fault.to_wire())  # and on through the wire form, as a plain GuestFault
    assert type(again) is errors.GuestFault and again.details() == details
    with pytest.raises(hlpool.PoolOverloadedError):  # codes without a remote fault class keep working
        raise error_from_response(429, b'{"error": {"code": "overloaded", "message": "full"}}')


# ---- the modules -----------------------------------------------------------------------------------------


def test_api_error_uses_the_codes_of_the_error_module():
    for cls in vars(errors).values():
        if not (isinstance(cls, type) and issubclass(cls, errors.HlpoolError)):
            continue
        exc = cls("boom")
        error = api_error(exc)
        expected = exc.code if exc.code in ERROR_STATUS else "internal"
        assert error.code == expected, cls
        if expected != "internal":
            assert error.details == exc.details()
        msgspec.convert(error.body(), schema.Error)  # every error body fits the documented struct
    assert api_error(errors.PoolClosedError("pool closed")).message == "the server is shutting down"
    assert ApiError("overloaded", "x").headers == {"Retry-After": "1"}
    assert api_error(errors.KvmError("ioctl")).message == "KvmError: ioctl"


def test_client_rebuilds_every_error_code():
    fault = {"vector": 6, "vector_name": "#UD invalid opcode", "error_code": None, "rip": 4096, "address": None}
    for code, cls in ERROR_CLASSES.items():
        body = {"error": {"code": code, "message": "m"}}
        if code == "guest_fault":
            body["error"]["details"] = fault
        exc = error_from_response(ERROR_STATUS[code], msgspec.json.encode(body))
        assert type(exc) is cls and (exc.code, exc.status, exc.message) == (code, ERROR_STATUS[code], "m")
    exc = error_from_response(502, msgspec.json.encode({"error": {"code": "guest_fault", "message": "m",
                                                                  "details": fault}}))
    assert {name: getattr(exc, name) for name in errors.GuestFault.FIELDS} == fault
    exc = error_from_response(418, msgspec.json.encode({"error": {"code": "teapot", "message": "m"}}))
    assert type(exc) is RemoteError and exc.code == "teapot" and exc.details == {}
    exc = error_from_response(502, b"<html>bad gateway</html>")
    assert type(exc) is RemoteError and exc.code == "http_502"


def test_no_list_of_fault_fields_and_no_default_numbers_in_service_or_cli():
    for path in [*(SOURCES / "service").glob("*.py"), *(SOURCES / "cli").glob("*.py")]:
        text = path.read_text()
        assert "vector_name" not in text, path  # the fields come from GuestFault.FIELDS / to_wire()
        assert not re.search(r"8470|8 << 20|default=(10\.0|1024)\b", text), path  # from hlpool.defaults


def test_cli_defaults_come_from_the_defaults_module():
    serve_help = subprocess.run([*HLPOOL, "serve", "--help"], capture_output=True, text=True, env=CLEAN_ENV,
                                timeout=60).stdout
    text = " ".join(serve_help.split())
    assert f"default {defaults.PORT};" in text and f"default {defaults.MAX_PENDING})" in text
    assert f"default {defaults.CALL_TIMEOUT:g})" in text and f"default {defaults.SHUTDOWN_GRACE:g})" in text
    assert f"default {defaults.MAX_BODY >> 20}M)" in text and f"default {defaults.HOST};" in text
    call_help = subprocess.run([*HLPOOL, "call", "--help"], capture_output=True, text=True, env=CLEAN_ENV,
                               timeout=60).stdout
    assert defaults.URL in call_help


def test_guest_specs(tmp_path):
    from hlpool.cli.main import parse_guest_specs

    elf = tmp_path / "g.elf"
    elf.write_bytes(b"\x7fELF")
    assert parse_guest_specs([f"g={elf}"]) == {"g": str(elf)}
    for specs, message in ((["g"], "expected NAME=PATH"), ([f"a/b={elf}"], "the name must be"),
                           ([f"g={elf}", f"g={elf}"], "given twice"), ([f"g={tmp_path}/nope"], "is not a file")):
        with pytest.raises(errors.HlpoolError, match=message):
            parse_guest_specs(specs)


def test_describe_covers_the_snapshot_struct(snapshots):
    from hlpool.snapshot.describe import describe_snapshot

    info = describe_snapshot(snapshots("add"))
    described = {"name": "add", "id": "0" * 16, "sha256": "0" * 64, "source": "x", "stored_bytes": 1, **info}
    assert msgspec.to_builtins(msgspec.convert(described, schema.SnapshotInfo)) == described
