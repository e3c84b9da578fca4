"""`hlpool serve`: the real server process on a local port, real HTTP clients, real workers and VMs.

One server (the example guests, two workers) is shared by most tests; the
token, SIGTERM and bind-refusal tests start their own. The server is started
with ``--port 0`` (the kernel picks a free port, no race) and the URL is read
from its "listening on" log line.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPConnection
from pathlib import Path

import pytest

import hlpool
from hlpool.guest.examples import EXAMPLES
from hlpool.service.client import Client, RemoteError, ServerUnreachable

pytestmark = pytest.mark.kvm

HLPOOL = [sys.executable, "-m", "hlpool.cli"]
START_TIMEOUT = 90.0
# the commands under test read these; the tests set them explicitly
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("HLPOOL_TOKEN", "HLPOOL_URL")}


# ---- helpers ---------------------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, ppid) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text.rsplit(")", 1)[1].split()
    return comm, fields[0], int(fields[1])


def descendants(root: int) -> dict[int, str]:
    """pid -> comm of every live (not zombie) descendant of ``root``."""
    children: dict[int, list[int]] = {}
    comms: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat and stat[1] != "Z":
                comms[int(entry)] = stat[0]
                children.setdefault(stat[2], []).append(int(entry))
    out, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out[child] = comms[child]
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[1] != "Z"


def shm_names_of(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith((f"hlpool-{pid}-", f"sem.hlpool-{pid}-"))]


def http(method: str, url: str, body=None, *, data: bytes | None = None, headers: dict | None = None,
         timeout: float = 60.0):
    """One HTTP request; returns (status, parsed JSON body or text, headers)."""
    headers = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw, rheaders = r.status, r.read(), r.headers
    except urllib.error.HTTPError as exc:
        with exc:
            status, raw, rheaders = exc.code, exc.read(), exc.headers
    if (rheaders.get("Content-Type") or "").startswith("application/json"):
        return status, json.loads(raw), rheaders
    return status, raw.decode(), rheaders


class Server:
    """A running `hlpool serve` process."""

    def __init__(self, proc: subprocess.Popen, log_path: Path, url: str, token: str | None = None) -> None:
        self.proc = proc
        self.log_path = log_path
        self.url = url
        self.token = token

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def get(self, path: str, **kw):
        return http("GET", self.url + path, headers={**self._headers(), **kw.pop("headers", {})}, **kw)

    def post(self, path: str, body=None, **kw):
        return http("POST", self.url + path, body, headers={**self._headers(), **kw.pop("headers", {})}, **kw)

    def call(self, snapshot: str, fn: str, *args, timeout: float | None = None):
        """(status, body) of a call; bytes arguments are sent as base64."""
        body: dict = {"args": [encode(a) for a in args]}
        if timeout is not None:
            body["timeout"] = timeout
        status, answer, _ = self.post(f"/v1/snapshots/{snapshot}/calls/{fn}", body)
        return status, answer

    def metrics(self) -> str:
        status, text, _ = self.get("/metrics")
        assert status == 200
        return text

    def workers(self) -> dict[int, str]:
        return {pid: comm for pid, comm in descendants(self.pid).items() if comm.startswith("hlpool-worker")}

    def stop(self, sig: int | None = signal.SIGTERM, timeout: float = 30.0) -> int:
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the server did not exit within {timeout} s:\n{self.log()}")


def encode(value):
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value


def start_server(directory: Path, *args: str, token: str | None = None, store: Path | None = None) -> Server:
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / f"server-{time.monotonic_ns()}.log"
    command = [*HLPOOL, "serve", "--workers", "2", "--frontends", "1", "--port", "0",  # later --frontends win
               "--snapshot-dir", str(store or directory / "store"), *args]
    if token:
        command += ["--token", token]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=CLEAN_ENV)
    server = None
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited with {proc.returncode} while starting:\n"
                                     f"{log_path.read_text()}")
            match = re.search(r"listening on (http://\S+)", log_path.read_text(errors="replace"))
            if match:
                server = Server(proc, log_path, match.group(1), token)
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the server did not start within {START_TIMEOUT} s:\n{log_path.read_text()}")
        while time.monotonic() < deadline:
            status, body, _ = server.get("/readyz")
            if status == 200 and body["ready"]:
                return server
            time.sleep(0.05)
        raise AssertionError(f"the server did not become ready:\n{server.log()}")
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise


def assert_stopped_cleanly(server: Server, helpers: dict[int, str], exit_timeout: float = 30.0,
                           sig: int | None = signal.SIGTERM) -> None:
    """Stop the server with ``sig`` (None: it was signalled already): it exits 0 and leaves no process
    (``helpers``: its descendants, recorded before) or IPC name."""
    code = server.stop(sig, timeout=exit_timeout)
    assert code == 0, f"exit status {code}:\n{server.log()}"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (any(alive(p) for p in helpers) or shm_names_of(server.pid)):
        time.sleep(0.05)
    assert not [p for p in helpers if alive(p)], f"processes left behind: {helpers}"
    assert shm_names_of(server.pid) == [], "shared-memory names left behind"
    assert "Traceback" not in server.log(), server.log()


# ---- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One snapshot store for every server of this module (snapshots are built once)."""
    return tmp_path_factory.mktemp("server-store")


@pytest.fixture(scope="module")
def server(kvm, tmp_path_factory, store):
    # files under the session's temporary directory may be registered by path
    srv = start_server(tmp_path_factory.mktemp("server"), "--allow-dir", str(tmp_path_factory.getbasetemp()),
                       store=store)
    helpers = descendants(srv.pid)
    assert sorted(helpers.values()) == ["hlpool-spawner", "hlpool-worker-0", "hlpool-worker-1"]
    yield srv
    helpers.update(descendants(srv.pid))
    assert_stopped_cleanly(srv, helpers)


GUEST_SOURCE = r"""
#include <hlpool.h>
static hl_value twice(const hl_args *a) { return hl_int(2 * hl_arg_int(a, 0)); }
int hl_main(void) { hl_export("twice", twice); return 0; }
"""


@pytest.fixture(scope="module")
def small_guest(tmp_path_factory) -> Path:
    from hlpool.guest.build import build_guest

    d = tmp_path_factory.mktemp("small-guest")
    (d / "twice.c").write_text(GUEST_SOURCE)
    return build_guest([d / "twice.c"], d / "twice.elf")


# ---- the shared server --------------------------------------------------------------------------------


def test_lists_the_example_snapshots(server):
    status, body, _ = server.get("/v1/snapshots")
    assert status == 200
    by_name = {s["name"]: s for s in body["snapshots"]}
    assert set(by_name) == set(EXAMPLES)
    add = by_name["add"]
    assert add["exports"] == ["add", "sum"] and len(add["id"]) == 16 and add["sha256"].startswith(add["id"])
    assert add["path"].endswith(".hlsnap") and add["layers"][0]["bytes"] > 0 and add["regions"]
    assert add["memory"]["heap"] > 0 and add["stored_bytes"] > 0
    status, one, _ = server.get("/v1/snapshots/add")
    assert status == 200 and one == add
    assert server.get("/healthz")[0] == 200


def test_calls_with_every_json_type(server):
    values = [None, True, False, 0, -1, 2**63 - 1, -2**63, 2.5, "", "héllo ✓", [], [1, [2, [3]]], {},
              {"k": None, "nested": {"list": [1.5, "x"]}}, b"", b"\x00\xffbytes", [b"a", {"b": b"c"}]]
    for value in values:
        status, body = server.call("echo", "echo", value)
        assert status == 200, body
        assert body == {"result": encode(value)}
    assert server.call("add", "add", 2, 40) == (200, {"result": 42})
    assert server.call("hostcall", "greet", "world") == (200, {"result": "Hello, world!"})
    assert server.call("hostcall", "total", 10) == (200, {"result": sum(i * i for i in range(10))})
    # an empty body means no arguments
    status, body, _ = server.post("/v1/snapshots/echo/calls/noop")
    assert status == 200 and body == {"result": None}


def test_concurrent_clients(server):
    results: dict[int, list] = {}
    failures: list = []

    def client(k: int) -> None:
        try:
            results[k] = [server.call("echo", "echo", [k, i, b"x"]) for i in range(100)]
        except Exception as exc:  # noqa: BLE001 (reported below)
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures
    for k in range(5):
        assert results[k] == [(200, {"result": [k, i, {"base64": "eA=="}]}) for i in range(100)]


def test_request_errors(server):
    def post_raw(path: str, data: bytes):
        return http("POST", server.url + path, data=data, headers={"Content-Type": "application/json"})

    status, body, _ = post_raw("/v1/snapshots/add/calls/add", b'{"args": [1, 2')
    assert status == 400 and body["error"]["code"] == "bad_json" and body["error"]["message"]
    status, body, _ = post_raw("/v1/snapshots/add/calls/add", b"\xff\xfe\x00garbage")
    assert status == 400 and body["error"]["code"] == "bad_json"
    for bad in ({"args": {"a": 1}}, {"args": "x"}, [1, 2], {"args": [], "extra": 1}, {"args": [], "timeout": -1},
                {"args": [], "timeout": "soon"}, {"args": [{"base64": "not base64!"}]}):
        status, body, _ = server.post("/v1/snapshots/add/calls/add", bad)
        assert status == 400 and body["error"]["code"] == "bad_request", (bad, body)
    status, body = server.call("add", "add", 1, "x")  # the guest rejects the argument type
    assert status == 400 and body["error"] == {"code": "bad_request",
                                               "message": "add: argument 1: expected int, got str"}
    status, body = server.call("add", "add", 2**64)  # not a 64-bit integer
    assert status == 400 and body["error"]["code"] == "bad_request"
    status, body = server.call("nope", "add")
    assert status == 404 and body["error"]["code"] == "unknown_snapshot"
    status, body = server.call("add", "nope")
    assert status == 404 and body["error"]["code"] == "unknown_function" and "add, sum" in body["error"]["message"]
    status, body, _ = server.get("/v1/snapshots/nope")
    assert status == 404 and body["error"]["code"] == "unknown_snapshot"
    status, body, _ = server.get("/no/such/route")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body, headers = http("DELETE", server.url + "/v1/snapshots")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    assert sorted(headers["Allow"].split(",")) == ["GET", "POST"]


def test_size_limits(server):
    # a body over --max-body (8 MiB): 413 as JSON, with a Content-Length ...
    status, body, _ = http("POST", server.url + "/v1/snapshots/echo/calls/echo", data=b" " * (9 << 20),
                           headers={"Content-Type": "application/json"})
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    # ... and chunked, without one
    host, port = urllib.parse.urlsplit(server.url).netloc.split(":")
    conn = HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", "/v1/snapshots/echo/calls/echo", body=iter([b" " * (1 << 20)] * 9),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"]["code"] == "payload_too_large"
    finally:
        conn.close()
    # arguments that fit the body limit but not the sandbox's input buffer
    status, body = server.call("echo", "echo", b"x" * (3 << 20))
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    assert server.call("echo", "echo", b"x" * 1000)[0] == 200


def test_guest_errors(server):
    status, body = server.call("faults", "null_deref")
    assert status == 502 and body["error"]["code"] == "guest_fault"
    details = body["error"]["details"]
    assert details["vector"] == 14 and details["address"] == 0 and details["rip"] > 0
    assert "page fault" in details["vector_name"]
    status, body = server.call("faults", "divide_by_zero")
    assert status == 502 and body["error"]["details"]["vector"] == 0
    start = time.monotonic()
    status, body = server.call("faults", "infinite_loop", timeout=0.3)
    assert status == 504 and body["error"]["code"] == "timeout"
    assert time.monotonic() - start < 5
    status, body = server.call("faults", "fail", "on purpose")
    assert status == 422 and body["error"] == {"code": "guest_error", "message": "fail: failed on purpose: on purpose"}
    status, body = server.call("hostcall", "ask", "no_such_host_function")
    assert status == 502 and body["error"]["code"] == "host_function_error"
    assert server.call("faults", "fail", "still alive")[0] == 422
    assert server.call("add", "add", 1, 1) == (200, {"result": 2})


def test_register_by_path_and_by_upload(server, small_guest, tmp_path):
    status, body, headers = server.post("/v1/snapshots", {"name": "twice", "path": str(small_guest)})
    assert status == 201, body
    assert body["name"] == "twice" and body["exports"] == ["twice"] and headers["Location"] == "/v1/snapshots/twice"
    assert server.call("twice", "twice", 21) == (200, {"result": 42})
    # a .hlsnap file is served as it is
    snap = hlpool.Snapshot.from_elf(small_guest).persist(tmp_path / "twice.hlsnap")
    status, body, _ = server.post("/v1/snapshots", {"name": "twice.snap", "path": snap.path})
    assert status == 201 and body["path"] == snap.path
    assert server.call("twice.snap", "twice", 5) == (200, {"result": 10})
    # an upload
    elf = small_guest.read_bytes()
    status, body, headers = http("PUT", server.url + "/v1/snapshots/twice-up", data=elf,
                                 headers={"Content-Type": "application/octet-stream"})
    assert headers["Location"] == "/v1/snapshots/twice-up"
    assert status == 201 and body["source"] == f"upload of {len(elf)} bytes"
    assert server.call("twice-up", "twice", 4) == (200, {"result": 8})
    assert not [p for p in Path(body["path"]).parent.iterdir() if p.name.startswith(".upload-")]
    names = {s["name"] for s in server.get("/v1/snapshots")[1]["snapshots"]}
    assert {"twice", "twice.snap", "twice-up"} <= names
    # the client does the same
    client = Client(server.url)
    assert client.upload("twice-client", small_guest)["exports"] == ["twice"]
    assert client.call("twice-client", "twice", 50) == 100


def test_scripts_over_http(server):
    source = "function handler(e) { return {greeting: 'hi ' + e.name, n: e.n * 2}; }"
    status, body, _ = server.post("/v1/snapshots", {"name": "hello-js", "language": "js", "source": source})
    assert status == 201, body
    assert body["source"].startswith("js script") and len(body["layers"]) == 2  # a layer on the base
    assert server.call("hello-js", "handler", {"name": "you", "n": 21}) == (
        200, {"result": {"greeting": "hi you", "n": 42}})
    status, body = server.call("hello-js", "nope")
    assert status == 422 and body["error"]["code"] == "guest_error"
    status, body, _ = server.post("/v1/snapshots", {"name": "add-lua", "language": "lua",
                                                    "source": "function add(a, b) return a + b end"})
    assert status == 201, body
    assert server.call("add-lua", "add", 40, 2) == (200, {"result": 42})
    status, body, _ = server.post("/v1/snapshots", {"name": "broken", "language": "js", "source": "function ("})
    assert status == 422 and body["error"]["code"] == "snapshot_error" and "SyntaxError" in body["error"]["message"]
    status, body, _ = server.post("/v1/snapshots", {"name": "x", "language": "cobol", "source": ""})
    assert status == 400 and "unknown script language" in body["error"]["message"]


def test_register_errors(server, small_guest, tmp_path):
    def upload(name: str, data: bytes):
        return http("PUT", server.url + f"/v1/snapshots/{name}", data=data,
                    headers={"Content-Type": "application/octet-stream"})

    status, body, _ = upload("junk", b"this is not an ELF file")
    assert status == 422 and body["error"]["code"] == "snapshot_error"
    status, body, _ = upload("junk", b"\x7fELF" + b"\x00" * 200)
    assert status == 422 and body["error"]["code"] == "snapshot_error"
    status, body, _ = server.post("/v1/snapshots", {"name": "missing", "path": str(tmp_path / "missing.elf")})
    assert status == 422 and body["error"]["code"] == "snapshot_error"
    status, body, _ = server.post("/v1/snapshots", {"name": "outside", "path": "/etc/passwd"})  # not --allow-dir
    assert status == 403 and body["error"]["code"] == "forbidden"
    status, body, _ = upload("bad/name", small_guest.read_bytes())
    assert status == 404 and body["error"]["code"] == "not_found"  # no route: a name has no slash
    status, body, _ = upload("bad%20name", small_guest.read_bytes())
    assert status == 400 and body["error"]["code"] == "bad_request"
    status, body, _ = server.post("/v1/snapshots", {"name": "add", "path": str(small_guest)})
    assert status == 409 and body["error"]["code"] == "snapshot_exists"
    status, body, _ = upload("add", small_guest.read_bytes())
    assert status == 409 and body["error"]["code"] == "snapshot_exists"
    for bad in ({"name": "bad/name", "path": str(small_guest)}, {"name": "x" * 65, "path": str(small_guest)},
                {"name": "rel", "path": "twice.elf"}, {"name": "x"}, {"name": "x", "path": "/x", "more": 1}, [1]):
        status, body, _ = server.post("/v1/snapshots", bad)
        assert status == 400 and body["error"]["code"] == "bad_request", (bad, body)
    status, body, _ = http("POST", server.url + "/v1/snapshots", data=b"{nope",
                           headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"]["code"] == "bad_json"
    assert {"junk", "missing", "outside"}.isdisjoint(s["name"] for s in server.get("/v1/snapshots")[1]["snapshots"])


def test_openapi_matches_the_routes(server):
    from hlpool.service.api_errors import ERROR_STATUS
    from hlpool.service.app import routes
    from hlpool.service.config import ServerConfig
    from hlpool.service.handlers import Service

    status, doc, _ = server.get("/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    served = {}
    for method, path, _handler in routes(Service(None, ServerConfig())):
        served.setdefault(path, set()).add(method.lower())
    assert {path: set(ops) for path, ops in doc["paths"].items()} == served
    schemas = doc["components"]["schemas"]
    error = schemas["Error"]["properties"]["error"]
    error = schemas[error["$ref"].rsplit("/", 1)[1]] if "$ref" in error else error  # the struct's component
    assert error["properties"]["code"]["enum"] == sorted(ERROR_STATUS)
    assert "security" not in doc  # this server has no token (see test_token_auth for one that has)


def test_metrics(server):
    server.call("add", "add", 1, 2)
    server.call("faults", "null_deref")
    text = server.metrics()

    def value(pattern: str) -> float:
        match = re.search(r"^" + pattern + r" ([0-9.e+-]+)$", text, re.M)
        assert match, f"{pattern} not in:\n{text}"
        return float(match.group(1))

    assert value(r'hlpool_calls_total\{function="add",outcome="ok",snapshot="add"\}') >= 1
    assert value(r'hlpool_calls_total\{function="null_deref",outcome="guest_fault",snapshot="faults"\}') >= 1
    assert value(r'hlpool_errors_total\{code="guest_fault"\}') >= 1
    assert value(r'hlpool_call_duration_seconds_count\{snapshot="add"\}') >= 1
    assert value(r'hlpool_call_duration_seconds_bucket\{le="\+Inf",snapshot="add"\}') >= 1
    assert value("hlpool_workers") == 2 and value("hlpool_workers_alive") == 2
    assert value("hlpool_worker_restarts_total") >= 0 and value("hlpool_live_vms") >= 1
    assert value("hlpool_ready") == 1 and value("hlpool_calls_in_flight") == 0
    for worker in ("0", "1"):
        assert value(rf'hlpool_worker_rss_bytes\{{worker="{worker}"\}}') > 0
        assert value(rf'hlpool_worker_pss_bytes\{{worker="{worker}"\}}') > 0
        assert value(rf'hlpool_worker_vms\{{worker="{worker}"\}}') >= 0
    assert value(r'hlpool_http_requests_total\{method="POST",route="/v1/snapshots/\{name\}/calls/\{function\}",'
                 r'status="200"\}') >= 1
    assert "_created" not in text


def test_hlpool_call_command(server):
    def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*HLPOOL, "call", *args], capture_output=True, text=True, timeout=60,
                              env={**CLEAN_ENV, **(env or {})})

    proc = run("--url", server.url, "add", "add", "2", "40")
    assert proc.returncode == 0 and json.loads(proc.stdout) == 42
    proc = run("echo", "echo", '[{"base64": "aGk="}, [1, null], 2.5]', env={"HLPOOL_URL": server.url})
    assert proc.returncode == 0 and json.loads(proc.stdout) == [{"base64": "aGk="}, [1, None], 2.5]
    proc = run("echo", "echo", "word", env={"HLPOOL_URL": server.url})  # a bare word is a string
    assert proc.returncode == 0 and json.loads(proc.stdout) == "word"
    proc = run("--url", server.url, "hostcall", "greet", "cli")
    assert json.loads(proc.stdout) == "Hello, cli!"
    proc = run("--url", server.url, "add", "nope")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("hlpool: error: unknown_function: ") and proc.stderr.count("\n") == 1
    proc = run("--url", server.url, "--timeout", "0.2", "faults", "infinite_loop")
    assert proc.returncode == 1 and proc.stderr.startswith("hlpool: error: timeout: ")
    proc = run("--url", "http://127.0.0.1:9", "add", "add", "1", "2")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "cannot reach the hlpool server" in proc.stderr
    assert run("--help").stdout.startswith("usage: hlpool call")


def test_client_maps_errors_to_hlpool_exceptions(server):
    client = Client(server.url)
    assert client.call("echo", "echo", [b"\x00", {"k": 1.5}]) == [b"\x00", {"k": 1.5}]
    with pytest.raises(hlpool.GuestFault) as info:
        client.call("faults", "null_deref")
    assert info.value.vector == 14 and info.value.code == "guest_fault" and info.value.status == 502
    with pytest.raises(hlpool.GuestTimeout):
        client.call("faults", "infinite_loop", timeout=0.2)
    with pytest.raises(hlpool.CallError, match="unknown_function"):
        client.call("add", "nope")
    with pytest.raises(RemoteError) as info:
        client.call("nope", "add")
    assert info.value.status == 404 and info.value.code == "unknown_snapshot"
    assert client.ready() and {s["name"] for s in client.snapshots()} >= set(EXAMPLES)
    with pytest.raises(ServerUnreachable):
        Client("http://127.0.0.1:9").call("add", "add", 1, 2)


def test_sigkill_of_a_worker_under_load(server):
    status, body = server.call("sha256", "digest_rounds", b"seed", 20000)
    assert status == 200
    expected = body
    outcomes: list = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(20):
            try:
                result = server.call("sha256", "digest_rounds", b"seed", 20000)
            except Exception as exc:  # noqa: BLE001 (a transport error fails the test below)
                result = (None, repr(exc))
            with lock:
                outcomes.append(result)

    threads = [threading.Thread(target=client) for _ in range(10)]
    for t in threads:
        t.start()
    # kill a worker of this server that is running calls
    deadline = time.monotonic() + 10
    victim = None
    while victim is None and time.monotonic() < deadline:
        text = server.metrics()
        busy = {w for w, n in re.findall(r'^hlpool_worker_in_flight\{worker="(\d+)"\} (\S+)$', text, re.M)
                if float(n) > 0}
        workers = {comm.rsplit("-", 1)[1]: pid for pid, comm in server.workers().items()}
        victim = next((workers[w] for w in sorted(busy) if w in workers), None)
    assert victim is not None, "no busy worker found"
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(timeout=120)
    assert len(outcomes) == 200
    crashed = [body for status, body in outcomes if status != 200]
    assert all(status in (200, 502) for status, _ in outcomes), [o for o in outcomes if o[0] not in (200, 502)]
    assert all(body["error"]["code"] == "worker_crashed" for body in crashed)
    assert all(body == expected for status, body in outcomes if status == 200)
    assert len(crashed) < 200
    # the server keeps serving with a replacement worker
    assert server.call("add", "add", 20, 22) == (200, {"result": 42})
    deadline = time.monotonic() + 10
    while server.get("/readyz")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.get("/readyz")[0] == 200
    assert victim not in server.workers() and len(server.workers()) == 2
    assert re.search(r"^hlpool_worker_restarts_total [1-9]", server.metrics(), re.M)


# ---- servers of their own ------------------------------------------------------------------------------


def test_token_auth(kvm, tmp_path, store, example):
    srv = start_server(tmp_path, "--guest", f"add={example('add')}", token="s3cret", store=store)
    try:
        helpers = descendants(srv.pid)
        url = srv.url + "/v1/snapshots/add/calls/add"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic czNjcmV0"}):
            status, body, rheaders = http("POST", url, {"args": [1, 2]}, headers=headers)
            assert status == 401 and body["error"]["code"] == "unauthorized"
            assert rheaders["WWW-Authenticate"].startswith("Bearer")
        for path in ("/readyz", "/metrics", "/openapi.json", "/v1/snapshots", "/no/such/route"):
            assert http("GET", srv.url + path)[0] == 401, path
        assert http("GET", srv.url + "/healthz")[0] == 200
        status, doc, _ = srv.get("/openapi.json")
        assert doc["security"] == [{"bearer": []}] and doc["paths"]["/healthz"]["get"]["security"] == []
        assert srv.call("add", "add", 1, 2) == (200, {"result": 3})
        status, body, _ = srv.get("/v1/snapshots")
        assert status == 200 and [s["name"] for s in body["snapshots"]] == ["add"]
        assert Client(srv.url, token="s3cret").call("add", "add", 2, 2) == 4
        with pytest.raises(RemoteError, match="unauthorized"):
            Client(srv.url, token="").call("add", "add", 2, 2)
        proc = subprocess.run([*HLPOOL, "call", "--url", srv.url, "add", "add", "1", "1"], capture_output=True,
                              text=True, timeout=60, env={**CLEAN_ENV, "HLPOOL_TOKEN": "s3cret"})
        assert proc.returncode == 0 and proc.stdout.strip() == "2"
    finally:
        helpers.update(descendants(srv.pid))
        assert_stopped_cleanly(srv, helpers)


def test_refuses_to_bind_a_public_address_without_a_token(tmp_path):
    for host in ("0.0.0.0", "::"):
        proc = subprocess.run([*HLPOOL, "serve", "--host", host, "--port", "0", "--snapshot-dir",
                               str(tmp_path)], capture_output=True, text=True, timeout=60, env=CLEAN_ENV)
        assert proc.returncode == 1
        assert proc.stderr.startswith(f"hlpool: error: refusing to listen on {host}")
        assert proc.stderr.count("\n") == 1 and "--token" in proc.stderr and "--insecure" in proc.stderr
    proc = subprocess.run([*HLPOOL, "serve", "--guest", "nameonly"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip() == "hlpool: error: --guest 'nameonly': expected NAME=PATH"


def test_refuses_a_port_in_use(server, tmp_path):
    port = urllib.parse.urlsplit(server.url).port
    proc = subprocess.run([*HLPOOL, "serve", "--port", str(port), "--snapshot-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"hlpool: error: cannot listen on 127.0.0.1:{port}: Address already in use")


def test_error_mapping():
    from hlpool import errors
    from hlpool.service.api_errors import ERROR_STATUS, api_error

    cases = {
        errors.PayloadTooLargeError("x"): ("payload_too_large", 413),
        errors.CallError("x"): ("bad_request", 400),
        errors.GuestFault("x", vector=6, rip=1): ("guest_fault", 502),
        errors.GuestTimeout("x"): ("timeout", 504),
        errors.GuestProtocolError("x"): ("guest_error", 422),
        errors.GuestError("x"): ("guest_error", 422),
        errors.HostFunctionError("x"): ("host_function_error", 502),
        errors.WorkerCrashed("x"): ("worker_crashed", 502),
        errors.PoolOverloadedError("x"): ("overloaded", 429),
        errors.PoolClosedError("x"): ("shutting_down", 503),
        errors.SnapshotIntegrityError("x"): ("snapshot_error", 422),
        errors.GuestImageError("x"): ("snapshot_error", 422),
        errors.SandboxBrokenError("x"): ("internal", 500),
        RuntimeError("x"): ("internal", 500),
    }
    for exc, (code, status) in cases.items():
        error = api_error(exc)
        assert (error.code, error.status) == (code, status), exc
        assert ERROR_STATUS[code] == status
    assert api_error(errors.GuestFault("x", vector=6, rip=1)).body()["error"]["details"]["vector"] == 6
    assert api_error(errors.PoolOverloadedError("x")).headers == {"Retry-After": "1"}
    assert api_error(RuntimeError("secret")).message == "internal server error"


@pytest.mark.parametrize("lane", ["fast", "aiohttp"])
def test_sigterm_finishes_calls_in_flight(kvm, tmp_path, store, example, lane):
    """Calls read by the fast lane (the default) and by aiohttp (--no-fast-lane) drain alike."""
    grace = 4.0
    srv = start_server(tmp_path, "--guest", f"sha256={example('sha256')}", "--guest", f"faults={example('faults')}",
                       "--grace", str(grace), *(["--no-fast-lane"] if lane == "aiohttp" else []), store=store)
    exited = False
    try:
        helpers = descendants(srv.pid)
        assert len(helpers) == 3
        # rounds of digest_rounds that take about 0.4 s here
        start = time.monotonic()
        assert srv.call("sha256", "digest_rounds", b"seed", 100_000)[0] == 200
        rounds = max(10_000, min(50_000_000, int(100_000 * 0.4 / max(time.monotonic() - start, 1e-3))))
        results: dict[str, list] = {"digest": [], "loop": []}

        def client(kind: str, *call) -> None:
            try:
                results[kind].append(srv.call(*call))
            except Exception as exc:  # noqa: BLE001 (checked below)
                results[kind].append((None, repr(exc)))

        def start_calls(n: int, in_flight: int, kind: str, *call) -> list[threading.Thread]:
            threads = [threading.Thread(target=client, args=(kind, *call)) for _ in range(n)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 10
            while not re.search(rf"^hlpool_calls_in_flight {in_flight}\.0$", srv.metrics(), re.M):
                assert time.monotonic() < deadline, "the calls did not start"
                time.sleep(0.01)
            return threads

        # three calls that finish within the grace period (on the worker that has sha256 warm), and
        # one that cannot (an endless loop with the default 10 s timeout, on the other worker)
        threads = start_calls(3, 3, "digest", "sha256", "digest_rounds", b"seed", rounds)
        threads += start_calls(1, 4, "loop", "faults", "infinite_loop")
        sent = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        # no new connections while draining (or, if the race is lost, a clean 503)
        try:
            status, body, _ = srv.get("/readyz", timeout=5)
            assert status == 503
        except (urllib.error.URLError, ConnectionError):
            pass
        for t in threads:
            t.join(timeout=30)
        assert len(results["digest"]) == 3 and all(status == 200 for status, _ in results["digest"]), results
        assert len({json.dumps(body) for _, body in results["digest"]}) == 1
        [(status, body)] = results["loop"]
        assert status == 503 and body["error"]["code"] == "shutting_down", body
        assert grace - 0.5 < time.monotonic() - sent < grace + 1.5
        assert_stopped_cleanly(srv, helpers, exit_timeout=grace + 5, sig=None)
        exited = True
        assert time.monotonic() - sent < grace + 3
        log = srv.log()
        assert "SIGTERM: shutting down" in log and "waiting for 4 call(s) in flight" in log
        assert "grace period over: ending 1 call(s)" in log
    finally:
        if not exited and srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
