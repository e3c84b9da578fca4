"""The HTTP service against hostile clients: each test replays an attack on a real `hlpool serve` process.

- registering by path: only files under ``--allow-dir`` (one answer for every path outside, whether it
  exists or not), only regular files within the size limit (a FIFO or ``/dev/zero`` cannot stall or spin a
  thread), no lock held while a snapshot builds, and SIGTERM stops the server during a build;
- bodies: deep JSON and lone surrogates are 400s, never 500s; slow clients are cut off (headers and body
  timeouts); a client that leaves mid-body, or sends a malformed request, is not an error in the log;
- the OpenAPI document agrees with the server (security only with a token, 405 with ``Allow``, no query
  parameter that is required but documented optional), checked by schemathesis within a time bound.

Every server listens on 127.0.0.1 with ``--port 0``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from test_server import CLEAN_ENV, HLPOOL, Server, assert_stopped_cleanly, descendants, http, start_server

from hlpool import defaults

pytestmark = pytest.mark.kvm

TWICE = r"""
#include <hlpool.h>
static hl_value twice(const hl_args *a) { return hl_int(2 * hl_arg_int(a, 0)); }
int hl_main(void) { hl_export("twice", twice); return 0; }
"""

# A guest whose initialisation never ends: building its snapshot takes until the init deadline.
ENDLESS_INIT = r"""
#include <hlpool.h>
static hl_value one(const hl_args *a) { (void)a; return hl_int(1); }
int hl_main(void) {
    hl_export("one", one);
    volatile int spin = 1;
    while (spin) { }
    return 0;
}
"""

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0


# ---- fixtures and helpers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guests(tmp_path_factory) -> dict[str, Path]:
    from hlpool.guest.build import build_guest

    d = tmp_path_factory.mktemp("hardening-guests")
    built = {}
    for name, source in (("twice", TWICE), ("endless", ENDLESS_INIT)):
        (d / f"{name}.c").write_text(source)
        built[name] = Path(build_guest([d / f"{name}.c"], d / f"{name}.elf"))
    return built


@pytest.fixture(scope="module")
def allowed(tmp_path_factory) -> Path:
    """The directory the open server allows (--allow-dir)."""
    return tmp_path_factory.mktemp("allowed")


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A directory no server allows."""
    return tmp_path_factory.mktemp("outside")


@pytest.fixture(scope="module")
def server(kvm, tmp_path_factory, allowed, example):
    """Registration by path from ``allowed``; short header and body timeouts."""
    srv = start_server(tmp_path_factory.mktemp("hardening-server"), "--guest", f"add={example('add')}",
                       "--guest", f"echo={example('echo')}", "--allow-dir", str(allowed),
                       "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT))
    helpers = descendants(srv.pid)
    yield srv
    helpers.update(descendants(srv.pid))
    assert_stopped_cleanly(srv, helpers)


@pytest.fixture(scope="module")
def token_server(kvm, tmp_path_factory, example):
    """A server with a token and without --allow-dir."""
    srv = start_server(tmp_path_factory.mktemp("hardening-token"), "--guest", f"add={example('add')}",
                       "--guest", f"faults={example('faults')}", token="t0ken")
    helpers = descendants(srv.pid)
    yield srv
    helpers.update(descendants(srv.pid))
    assert_stopped_cleanly(srv, helpers)


def address(server: Server) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(server.url)
    assert parts.hostname == "127.0.0.1"
    return parts.hostname, parts.port


def connect(server: Server, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(address(server), timeout=timeout)


def read_until_closed(sock: socket.socket, deadline: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection (or ``deadline``): (data, when)."""
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            return data, time.monotonic()
        if not chunk:
            return data, time.monotonic()
        data += chunk
    raise AssertionError(f"the server kept the connection open; it sent {data[:200]!r}")


def log_since(server: Server, offset: int) -> str:
    return server.log()[offset:]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def register_path(server: Server, name: str, path: str, timeout: float = 15.0):
    start = time.monotonic()
    status, body, _ = server.post("/v1/snapshots", {"name": name, "path": path}, timeout=timeout)
    return status, body, time.monotonic() - start


def upload(server: Server, name: str, data: bytes, timeout: float = 60.0):
    return http("PUT", f"{server.url}/v1/snapshots/{name}", data=data, timeout=timeout,
                headers={"Content-Type": "application/octet-stream", **server._headers()})


# ---- #3 registering by path ------------------------------------------------------------------------------


def test_registration_by_path_is_off_without_allow_dir(token_server, guests):
    for path in (str(guests["twice"]), "/etc/passwd", "/no/such/file", "/dev/zero"):
        status, body, elapsed = register_path(token_server, "p", path)
        assert status == 403 and body["error"]["code"] == "forbidden", body
        assert "--allow-dir" in body["error"]["message"] and elapsed < 5
    # uploads and scripts still work
    status, body, _ = upload(token_server, "twice-up", guests["twice"].read_bytes())
    assert status == 201 and body["exports"] == ["twice"], body
    assert token_server.call("twice-up", "twice", 21) == (200, {"result": 42})


def test_allow_dir_must_be_a_directory(tmp_path):
    for bad in (str(tmp_path / "missing"), str(Path(sys.executable))):
        proc = subprocess.run([*HLPOOL, "serve", "--port", "0", "--snapshot-dir", str(tmp_path), "--allow-dir", bad],
                              capture_output=True, text=True, timeout=60, env=CLEAN_ENV)
        assert proc.returncode == 1 and proc.stderr.startswith(f"hlpool: error: --allow-dir {bad}"), proc.stderr


def test_a_path_outside_the_allowed_dirs_gets_one_answer_whether_it_exists_or_not(server, allowed, outside,
                                                                                  guests):
    shutil.copy(guests["twice"], outside / "real.elf")
    if not (outside / "fifo").exists():
        os.mkfifo(outside / "fifo")
    links = {"link-to-real": outside / "real.elf", "link-to-missing": outside / "missing.elf",
             "dir-link": outside, "link-to-zero": Path("/dev/zero")}
    for name, target in links.items():
        if not (allowed / name).is_symlink():
            (allowed / name).symlink_to(target)
    paths = ["/etc/passwd", "/etc/no-such-file", "/dev/zero", "/proc/self/status", str(outside / "real.elf"),
             str(outside / "missing.elf"), str(outside / "fifo"), str(outside), str(allowed / "link-to-real"),
             str(allowed / "link-to-missing"), str(allowed / "link-to-zero"), str(allowed / "dir-link" / "real.elf"),
             str(allowed / "dir-link" / "missing.elf"), str(allowed / "dir-link" / "fifo"),
             f"{allowed}/../{outside.name}/real.elf", f"{allowed}/../{outside.name}/missing.elf", "/"]
    messages = set()
    for path in paths:
        status, body, elapsed = register_path(server, "outside", path)
        assert status == 403 and body["error"]["code"] == "forbidden", (path, body)
        assert elapsed < 5, path
        messages.add(body["error"]["message"].replace(repr(path), "PATH"))
    assert len(messages) == 1, messages  # nothing tells an existing file from a missing one
    assert "outside" not in {s["name"] for s in server.get("/v1/snapshots")[1]["snapshots"]}


def test_only_regular_files_within_the_limit_and_nothing_stalls(server, allowed, guests):
    if not (allowed / "fifo").exists():
        os.mkfifo(allowed / "fifo")
    (allowed / "a-directory").mkdir(exist_ok=True)
    with open(allowed / "huge.elf", "wb") as f:
        f.truncate(defaults.MAX_BODY + 1)  # sparse: over the server's upload limit
    cases = {str(allowed / "fifo"): "not a regular file", str(allowed / "a-directory"): "not a regular file",
             str(allowed / "missing.elf"): "No such file", str(allowed / "huge.elf"): "limit"}
    if os.geteuid() == 0:  # a character device (like /dev/zero) inside the allowed directory
        if not (allowed / "zero").exists():
            os.mknod(allowed / "zero", 0o600 | 0o020000, os.makedev(1, 5))
        cases[str(allowed / "zero")] = "not a regular file"
    cpu_before = cpu_seconds(server.pid)
    for path, message in cases.items():
        status, body, elapsed = register_path(server, "irregular", path)
        assert status == 422 and body["error"]["code"] == "snapshot_error", (path, body)
        assert message in body["error"]["message"] and elapsed < 5, (path, body)
    time.sleep(0.5)
    assert cpu_seconds(server.pid) - cpu_before < 2.0  # no thread left spinning on /dev/zero
    # the failed registrations gave the name back, and a regular file in the directory registers
    shutil.copy(guests["twice"], allowed / "twice.elf")
    status, body, _ = register_path(server, "irregular", str(allowed / "twice.elf"), timeout=60)
    assert status == 201 and body["source"] == str(allowed / "twice.elf"), body
    assert server.call("irregular", "twice", 4) == (200, {"result": 8})
    # a snapshot file is served in place
    import hlpool

    snap = hlpool.Snapshot.from_elf(guests["twice"]).persist(allowed / "twice.hlsnap")
    status, body, _ = register_path(server, "twice-snap", snap.path, timeout=60)
    assert status == 201 and body["path"] == snap.path, body
    assert server.call("twice-snap", "twice", 5) == (200, {"result": 10})


def test_a_build_holds_no_lock_and_sigterm_stops_the_server_meanwhile(kvm, tmp_path, guests, example):
    srv = start_server(tmp_path, "--guest", f"add={example('add')}", "--grace", "1")
    exited = False
    try:
        helpers = descendants(srv.pid)
        slow: list = []

        def build_endless() -> None:
            try:
                slow.append(upload(srv, "endless", guests["endless"].read_bytes(), timeout=120))
            except OSError as exc:  # the server stops before it answers
                slow.append(exc)

        thread = threading.Thread(target=build_endless, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the name is reserved while it builds (before: 422, not an ELF)
            status, body, _ = upload(srv, "endless", b"not an ELF")
            if status == 409:
                break
            time.sleep(0.05)
        assert status == 409 and body["error"]["code"] == "snapshot_exists", body
        # other registrations do not wait for that build
        start = time.monotonic()
        status, body, _ = upload(srv, "twice", guests["twice"].read_bytes(), timeout=60)
        assert status == 201, body
        status, body, _ = srv.post("/v1/snapshots", {"name": "lua", "language": "lua",
                                                     "source": "function f() return 1 end"}, timeout=60)
        assert status == 201, body
        assert time.monotonic() - start < 20
        assert srv.call("add", "add", 1, 2) == (200, {"result": 3})
        assert not slow and thread.is_alive()  # still building
        # one SIGTERM stops the server while the build runs (and leaves no process behind: a builder neither)
        helpers.update(descendants(srv.pid))
        sent = time.monotonic()
        assert_stopped_cleanly(srv, helpers, exit_timeout=15, sig=signal.SIGTERM)
        exited = True
        assert time.monotonic() - sent < 10
    finally:
        if not exited and srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()


# ---- #8 bodies and connections --------------------------------------------------------------------------


def post_raw(server: Server, path: str, data: bytes, content_type: str = "application/json"):
    return http("POST", server.url + path, data=data, headers={"Content-Type": content_type, **server._headers()})


def test_deep_json_and_lone_surrogates_are_400s(server):
    offset = len(server.log())
    call = "/v1/snapshots/echo/calls/echo"
    deep = "[" * 900 + "]" * 900
    cases = [
        (call, f'{{"args": [{deep}]}}'.encode(), "nested deeper than"),
        (call, ("[" * 5000 + "]" * 5000).encode(), "nested deeper than"),  # beyond json's own recursion limit
        (call, ('{"args": [{"k": ' + deep + '}]}').encode(), "nested deeper than"),
        (call, b'{"args": ["\\ud800"]}', "lone surrogate"),
        (call, b'{"args": [{"\\udc00": 1}]}', "lone surrogate"),
        (call, b'{"args": ["ok", ["\\udfff x"]]}', "lone surrogate"),
        (call, '{"args": ["\ud800"]}'.encode("utf-16", "surrogatepass"), "lone surrogate"),
        (call, ('{"args": [%s1%s]}' % ("[" * 40, "]" * 40)).encode(), "deeper than"),  # over the guest's 32
        ("/v1/snapshots", b'{"name": "s", "language": "js", "source": "\\ud800"}', "lone surrogate"),
        ("/v1/snapshots", b'{"name": "s", "path": "/tmp/\\ud800"}', "lone surrogate"),
        ("/v1/snapshots", b'{"name": "s", "path": "/tmp/a\\u0000b"}', "NUL"),
        ("/v1/snapshots", f'{{"name": {deep}}}'.encode(), "nested deeper than"),
    ]
    for path, data, message in cases:
        status, body, _ = post_raw(server, path, data)
        assert status == 400 and body["error"]["code"] == "bad_request", (data[:60], body)
        assert message in body["error"]["message"], (data[:60], body)
    # what a guest can hold still goes through
    value = ["héllo ✓ \U0001F600", {"ключ": [1, 2.5, None]}, json.loads("[" * 30 + "]" * 30)]
    status, body, _ = server.post(call, {"args": [value]})
    assert status == 200 and body == {"result": value}, body
    log = log_since(server, offset)
    assert "Traceback" not in log and "unhandled" not in log, log


def test_a_slow_client_is_cut_off(server):
    start = time.monotonic()
    # (a) connects and sends nothing
    with connect(server) as quiet:
        data, closed = read_until_closed(quiet, start + HEADER_TIMEOUT + 5)
        assert data == b"" and closed - start < HEADER_TIMEOUT + 2
    # (b) sends its headers a byte at a time, never finishing them
    start = time.monotonic()
    with connect(server) as trickle:
        request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000
        for i, byte in enumerate(request):
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                break
            if time.monotonic() - start > HEADER_TIMEOUT + 5:
                raise AssertionError("the server still reads headers after the header timeout")
            time.sleep(0.02)
        assert time.monotonic() - start < HEADER_TIMEOUT + 2
    # (c) sends its headers, then its body slowly
    start = time.monotonic()
    with connect(server) as slow_body:
        slow_body.sendall(b"POST /v1/snapshots/echo/calls/echo HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"args\": [")
        answer = b""
        slow_body.settimeout(0.3)
        while time.monotonic() - start < BODY_TIMEOUT + 10 + 5:
            try:
                slow_body.sendall(b" ")
                chunk = slow_body.recv(65536)
                if not chunk:
                    break
                answer += chunk
            except socket.timeout:
                continue
            except OSError:
                break
        else:
            raise AssertionError(f"the server kept a slow body's connection open; it sent {answer[:300]!r}")
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
        assert b'"code":"request_timeout"' in answer
        assert time.monotonic() - start < BODY_TIMEOUT + min(BODY_TIMEOUT, 10) + 2
    assert server.call("add", "add", 1, 2) == (200, {"result": 3})  # everyone else is served


def test_clients_that_leave_mid_body_or_send_garbage_are_not_errors_in_the_log(server):
    offset = len(server.log())
    for request in (
        b"POST /v1/snapshots/echo/calls/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{\"args\": [1, 2",
        b"PUT /v1/snapshots/leaving HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: 100000\r\n\r\n\x7fELF",
        b"POST /v1/snapshots HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"name\"",
    ):
        with connect(server) as sock:
            sock.sendall(request)
            time.sleep(0.2)  # the handler is reading the body
    for garbage in (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                    b"GET /" + b"x" * 20000 + b" HTTP/1.1\r\n\r\n", b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                    b"POST /v1/snapshots HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
        with connect(server) as sock:
            sock.sendall(garbage)
            data, _ = read_until_closed(sock, time.monotonic() + 10)
            assert data == b"" or data.startswith(b"HTTP/1.1 4") or data.startswith(b"HTTP/1.0 4"), data[:100]
    # compressed bodies: broken ones are 400s, a bomb is held to --max-body after decompression
    call = "/v1/snapshots/echo/calls/echo"
    for encoding in ("gzip", "deflate"):
        status, body, _ = http("POST", server.url + call, data=b"not compressed at all",
                               headers={"Content-Type": "application/json", "Content-Encoding": encoding})
        assert status == 400 and body["error"]["code"] == "bad_request", body
    bomb = gzip.compress(b'{"args": ["' + b"a" * (64 << 20) + b'"]}', 9)
    status, body, _ = http("POST", server.url + call, data=bomb,
                           headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert status == 413 and body["error"]["code"] == "payload_too_large", body
    status, body, _ = http("POST", server.url + call, data=gzip.compress(b'{"args": [[1, "x"]]}'),
                           headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert (status, body) == (200, {"result": [1, "x"]})
    time.sleep(0.5)
    assert server.call("add", "add", 2, 2) == (200, {"result": 4})
    log = log_since(server, offset)
    assert "Traceback" not in log and "ERROR" not in log and "unhandled" not in log, log


def test_a_header_that_is_not_utf8_is_a_401_not_a_500(token_server):
    for value in (b"Bearer \xff\xfe", b"Bearer t0ken\xc3", b"\xff"):
        with connect(token_server) as sock:
            sock.sendall(b"GET /v1/snapshots HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: " + value +
                         b"\r\n\r\n")
            data, _ = read_until_closed(sock, time.monotonic() + 10)
        assert data.startswith(b"HTTP/1.1 401 "), data[:200]
    assert "Traceback" not in token_server.log()


def test_unusual_methods_do_not_grow_the_metrics(server):
    methods = ("PROPFIND", "MKCOL", "PURGE", "SEARCH", "LOCK", "REPORT", "MKCALENDAR", "FOOBAR", "M0X")
    for method in methods:
        with connect(server) as sock:
            sock.sendall(f"{method} /v1/snapshots HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data, _ = read_until_closed(sock, time.monotonic() + 10)
            assert data.startswith((b"HTTP/1.1 405 ", b"HTTP/1.0 400 ")), data[:100]  # 400: the parser's refusal
    labels = {line.split('method="')[1].split('"')[0] for line in server.metrics().splitlines()
              if line.startswith("hlpool_http_requests_total{")}
    assert labels <= {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "other"}, labels


# ---- #9 the OpenAPI document agrees with the server --------------------------------------------------------


def allowed_methods(headers) -> set[str]:
    return {m.strip().lower() for m in headers["Allow"].split(",") if m.strip()}


def test_the_document_agrees_with_the_server(server, token_server):
    for srv, token in ((server, False), (token_server, True)):
        status, doc, _ = srv.get("/openapi.json")
        assert status == 200
        assert ("security" in doc) is token and ("securitySchemes" in doc["components"]) is token
        for path, operations in doc["paths"].items():
            concrete = path.replace("{name}", "add").replace("{function}", "add")
            for method, operation in operations.items():
                guarded = token and operation.get("security") != []
                assert ("401" in operation["responses"]) is guarded, (path, method)
                if method == "get":
                    status, _, _ = http("GET", srv.url + concrete)
                    assert (status == 401) is guarded, (path, status)
                for parameter in operation.get("parameters", []):
                    assert parameter["in"] == "path" and parameter["required"], (path, parameter)
            # a method the path does not document: 405 naming those it does
            status, body, headers = http("TRACE", srv.url + concrete, headers=srv._headers())
            assert status == 405 and body["error"]["code"] == "method_not_allowed", (path, body)
            assert allowed_methods(headers) == set(operations), (path, headers["Allow"])
    # an ELF is uploaded with PUT /v1/snapshots/{name} (its name in the path, not an optional ?name=)
    upload_op = doc["paths"]["/v1/snapshots/{name}"]["put"]
    assert set(upload_op["requestBody"]["content"]) >= {"application/octet-stream"}
    status, body, _ = post_raw(server, "/v1/snapshots?name=x", b"\x7fELF" + b"\x00" * 60, "application/octet-stream")
    assert status == 400 and "PUT /v1/snapshots/" in body["error"]["message"], body


SCHEMATHESIS_CONFIG = """
[checks.not_a_server_error]
# 502, 503 and 504 are documented outcomes of a guest (a fault, shutting down, a call's deadline): only a
# 500 is a server error here
expected-statuses = ["1xx", "2xx", "3xx", "4xx", "502", "503", "504"]

[checks.positive_data_acceptance]
# 422: a well-formed request the guest or the snapshot builder refused (a script with a syntax error,
# a function a script does not define); 403: registration by path outside --allow-dir
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]

[[operations]]
# a call's arguments are any JSON values to the document; the function called checks them (the guest's
# "expected int, got str", an integer beyond 64 bits): 400 bad_request
include-operation-id = "call"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "422",
                                                     "429", "5xx"]
"""


def test_schemathesis_finds_no_disagreement(token_server, tmp_path):
    pytest.importorskip("schemathesis")
    (tmp_path / "schemathesis.toml").write_text(SCHEMATHESIS_CONFIG)
    command = [os.path.join(os.path.dirname(sys.executable), "st"), "--config-file",
               str(tmp_path / "schemathesis.toml"), "run", token_server.url + "/openapi.json",
               "--checks", "all", "--max-examples", "8", "--max-time", "30", "--request-timeout", "20",
               "--phases", "examples,coverage,fuzzing,stateful", "--seed", "1", "--workers", "1",
               "-H", "Authorization: Bearer t0ken", "--no-color", "--report-dir", str(tmp_path / "report")]
    offset = len(token_server.log())
    proc = subprocess.run(command, capture_output=True, text=True, timeout=55, cwd=tmp_path,
                          env={**CLEAN_ENV, "SCHEMATHESIS_TELEMETRY": "false", "NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    log = log_since(token_server, offset)
    assert "Traceback" not in log and "unhandled" not in log, log[-5000:]
