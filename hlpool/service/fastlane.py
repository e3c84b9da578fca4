"""The call route's fast lane: ``POST /v1/snapshots/{name}/calls/{function}`` answered without aiohttp.

Profiles of a front end under load put about half of its CPU per call in aiohttp
(the parser's callbacks, a request object, a task, the router, the middleware,
a response object and its headers) for a request whose work is one pool call.
So each connection starts in this lane: a protocol that reads the requests itself
and answers the plainest form of a call request, the form clients send for it,
with no task, no request or response object, and the answer in one ``write``.

Everything else goes to aiohttp, unchanged: the first request the lane does not
take whole (another route or method, a query, percent-escapes, a header it does not
know how to judge, ``Transfer-Encoding``, ``Content-Encoding``, ``Expect``,
``Upgrade``, HTTP/1.0, a body over ``--max-body``, a head or body not fully arrived,
anything malformed) hands the connection to aiohttp's protocol for good, with the bytes
not yet answered, at a request boundary: the lane has no answer outstanding
then. So what the lane takes is a strict subset of HTTP/1.1 that it parses whole
(one ``Content-Length``, header names that are tokens, values of visible ASCII),
and any doubt ends in aiohttp's parser, which answers as it always did. One difference
is on purpose: a call the lane took whole is answered even when bytes that are not HTTP
follow it in the same packet (aiohttp's parser, reading the whole packet first, answers
only its 400 for the garbage); the garbage then gets aiohttp's 400 as before.

What the lane keeps of the route's behaviour: the bearer token, the same checks
and answers (the handler's own parts, :meth:`Service.call_target`,
:meth:`Service.submit_call`, :meth:`Service.end_call`), the metrics, the
``X-Hlpool-Frontend`` header, answers in request order (requests that arrive
while one is in flight wait: at most one call per connection, as with aiohttp),
the header timeout (a connection that has not sent a whole request within
``--header-timeout`` of its start or of its last answer is closed), pauses of
reading and writing for a client that sends much more than it reads, and a drain
on shutdown. The access log and ``--no-fast-lane`` leave every request to aiohttp.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Callable

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from hlpool.service.api_errors import ApiError
from hlpool.service.handlers import CallInFlight, Service
from hlpool.service.schema import encode

log = logging.getLogger("hlpool.server")

CALL_ROUTE = "/v1/snapshots/{name}/calls/{function}"  # the metrics' label, as aiohttp's route names it
_REQUEST_LINE = re.compile(rb"POST /v1/snapshots/([A-Za-z0-9_.-]{1,64})/calls/([A-Za-z0-9_.~-]{1,255}) HTTP/1\.1")
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(rb"[\t\x20-\x7e]*")  # visible ASCII, space and tab: nothing to decode or doubt
_HANDED_OVER = frozenset((b"transfer-encoding", b"content-encoding", b"expect", b"upgrade"))
# Headers a request may carry once (aiohttp's parser refuses a second one, RFC 9110); HTTP/1.1 needs Host.
_SINGLETONS = frozenset((b"content-length", b"content-location", b"content-range", b"content-type", b"etag",
                         b"host", b"max-forwards", b"server", b"transfer-encoding", b"user-agent"))
MAX_HEAD = 8190  # bytes of request line and headers the lane reads (aiohttp's own line limit)
MAX_HEADERS = 64
_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
MAX_PIPELINED = 1 << 16  # bytes buffered behind a request in flight before reading pauses


class FastLane:
    """What the connections of one server share: the service, aiohttp's protocol factory (for the
    connections handed over) and the open connections (closed on shutdown)."""

    def __init__(self, service: Service, aiohttp_factory: Callable[[], asyncio.Protocol]) -> None:
        self.service = service
        self.aiohttp_factory = aiohttp_factory
        config = service.config
        self.max_body = config.max_body
        self.header_timeout = config.header_timeout
        self.token = config.token.encode() if config.token else None
        self.connections: set[CallConnection] = set()
        self.closing = False
        extra = f"X-Hlpool-Frontend: {service.frontend}\r\n" if service.frontend else ""
        self._fixed_headers = f"Server: {SERVER_SOFTWARE}\r\n{extra}".encode()
        self._date_second = -1
        self._date = b""

    def __call__(self) -> CallConnection:
        return CallConnection(self)

    def response(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> bytes:
        """An HTTP/1.1 answer with the JSON ``body`` (the headers aiohttp's answers carry)."""
        now = int(time.time())
        if now != self._date_second:  # the Date header changes once a second
            self._date_second, self._date = now, formatdate(now, usegmt=True).encode()
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode() if headers else b""
        return b"%sContent-Type: application/json; charset=utf-8\r\nContent-Length: %d\r\nDate: %s\r\n%s%s\r\n%s" % (
            _STATUS_LINES[status], len(body), self._date, self._fixed_headers, extra, body)

    def close(self) -> None:
        """Shutting down: close idle connections now, the others once they have answered."""
        self.closing = True
        for connection in list(self.connections):
            connection.close_when_idle()


class CallConnection(asyncio.Protocol):
    """One client connection, in the fast lane until it sends a request the lane does not take."""

    def __init__(self, lane: FastLane) -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.call: CallInFlight | None = None  # the call being answered
        self.last = False  # close once the call in flight is answered (Connection: close, shutdown)
        self.eof = False  # the client sent all it will: answer the whole requests buffered, then close
        self.write_paused = False
        self.read_paused = False
        self.loop = asyncio.get_running_loop()
        self.idle_since = self.loop.time()
        self.timer: asyncio.TimerHandle | None = None

    # ---- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.lane.connections.add(self)
        self.timer = self.loop.call_at(self.idle_since + self.lane.header_timeout, self._check_idle)
        if self.lane.closing:
            self.close_when_idle()

    def data_received(self, data: bytes) -> None:
        self.buffer = self.buffer + data if self.buffer else data
        if self.call is None:
            self._next()
        elif len(self.buffer) > MAX_PIPELINED and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self.call is None:
            self._next()  # requests that arrived whole are answered (then the connection closes)
        return True  # keep the transport open for the answer; closed once idle

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lane.connections.discard(self)
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        # A call in flight still ends (its answer has nowhere to go): as with aiohttp, whose handlers
        # are not cancelled when their client leaves.

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.call is None:
            self._next()

    # ---- requests --------------------------------------------------------------

    def _next(self) -> None:
        """Answer the requests in the buffer, one at a time, while the lane can take them."""
        while self.transport is not None and self.call is None and not self.write_paused:
            if self.read_paused and len(self.buffer) <= MAX_PIPELINED:
                self.read_paused = False
                self.transport.resume_reading()
            if self.last:
                self.transport.close()
                return
            buffer = self.buffer
            if not buffer:
                if self.eof:
                    self.transport.close()
                return
            head_end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
            if head_end < 0:
                # A head that did not come in one piece (clients send a call's head at once): aiohttp's
                # parser reads it as it comes, answering a malformed one at once, as it always did.
                self._hand_over()
                return
            request = self._parse(buffer, head_end)
            if request is None:
                self._hand_over()
                return
            name, fn, body, authorization, close, end = request
            self.buffer = buffer[end:]
            if close:
                self.last = True
            self._serve(name, fn, body, authorization)

    def _parse(self, buffer: bytes, head_end: int) -> tuple[str, str, bytes, bytes | None, bool, int] | None:
        """A call request the lane takes whole at the buffer's start, else None (hand it over)."""
        lines = buffer[:head_end].split(b"\r\n")
        line = _REQUEST_LINE.fullmatch(lines[0])
        if line is None or len(lines) > MAX_HEADERS + 1:
            return None
        length = None
        authorization = None
        close = False
        seen: set[bytes] = set()
        for header in lines[1:]:
            name, colon, value = header.partition(b":")
            if not colon or _HEADER_NAME.fullmatch(name) is None or _HEADER_VALUE.fullmatch(value) is None:
                return None  # also a folded line (starts with a space), a bare CR or LF, a non-ASCII byte
            name = name.lower()
            value = value.strip(b" \t")
            if name in _SINGLETONS:
                if name in seen:
                    return None
                seen.add(name)
            if name == b"content-length":
                if not value.isdigit() or len(value) > 12:
                    return None
                length = int(value)
            elif name == b"connection":
                token = value.lower()
                if token == b"close":
                    close = True
                elif token != b"keep-alive":
                    return None
            elif name == b"authorization":
                if authorization is not None:
                    return None
                authorization = value
            elif name in _HANDED_OVER:
                return None
        if b"host" not in seen:
            return None
        length = length or 0
        end = head_end + 4 + length
        if length > self.lane.max_body or end > len(buffer):  # too large, or still arriving: aiohttp's timers
            return None
        return line[1].decode(), line[2].decode(), buffer[head_end + 4:end], authorization, close, end

    def _serve(self, name: str, fn: str, body: bytes, authorization: bytes | None) -> None:
        service = self.lane.service
        try:
            if self.lane.token is not None:
                self._check_token(authorization)
            call = service.submit_call(service.call_target(name, fn), fn, body)
        except ApiError as error:
            self._answer_error(error)
            return
        except Exception as exc:  # a bug: log it, answer 500 as the aiohttp route does
            self._answer_internal(exc)
            return
        self.call = call
        call.waiting.add_done_callback(self._answered)

    def _answered(self, waiting: asyncio.Future) -> None:
        call, self.call = self.call, None
        if self.lane.closing:
            self.last = True
        try:
            body = self.lane.service.end_call(call)  # type: ignore[arg-type]
        except ApiError as error:
            self._answer_error(error)
        except asyncio.CancelledError:  # nobody cancels these but the server's shutdown
            self.last = True
            self._answer_error(ApiError("shutting_down", "the server is shutting down"))
        except Exception as exc:
            self._answer_internal(exc)
        else:
            self._write(200, body)
        self.idle_since = self.loop.time()
        self._next()

    def _check_token(self, authorization: bytes | None) -> None:
        scheme, _, value = (authorization or b"").partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.lane.token):
            raise ApiError("unauthorized", "missing or wrong bearer token (send Authorization: Bearer TOKEN)",
                           headers={"WWW-Authenticate": 'Bearer realm="hlpool"'})

    def _answer_error(self, error: ApiError) -> None:
        self.lane.service.metrics.errors.labels(error.code).inc()
        headers = dict(error.headers)
        if headers.get("Connection") == "close":
            self.last = True
        self._write(error.status, encode(error.body()), headers)

    def _answer_internal(self, exc: Exception) -> None:
        log.error("unhandled error in POST %s", CALL_ROUTE, exc_info=exc)
        self._answer_error(ApiError("internal", f"internal server error ({type(exc).__name__})"))

    def _write(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.lane.service.metrics.count_request("POST", CALL_ROUTE, status)
        if self.last and not (headers and "Connection" in headers):
            headers = {**(headers or {}), "Connection": "close"}
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.lane.response(status, body, headers))

    # ---- handing over, idling, closing ---------------------------------------------

    def _hand_over(self) -> None:
        """Give the connection to aiohttp's protocol with the bytes not yet answered (no answer is
        outstanding: this runs between requests)."""
        transport = self.transport
        assert transport is not None and self.call is None
        self.lane.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        protocol = self.lane.aiohttp_factory()
        transport.set_protocol(protocol)
        self.transport = None
        protocol.connection_made(transport)
        if self.read_paused:
            transport.resume_reading()
        buffer, self.buffer = self.buffer, b""
        if buffer:
            protocol.data_received(buffer)
        if self.eof and not protocol.eof_received():  # the end of input this lane kept the transport open for
            transport.close()  # what the transport does when its protocol does not keep a half-closed connection

    def _check_idle(self) -> None:
        self.timer = None
        if self.transport is None:
            return
        deadline = self.idle_since + self.lane.header_timeout
        if self.call is None and self.loop.time() >= deadline:
            log.debug("closing a connection that sent no whole request within %g s", self.lane.header_timeout)
            self.transport.close()
            return
        if self.call is not None:  # the clock restarts when the call has been answered
            deadline = self.loop.time() + self.lane.header_timeout
        self.timer = self.loop.call_at(deadline, self._check_idle)

    def close_when_idle(self) -> None:
        self.last = True
        if self.call is None and self.transport is not None:
            self.transport.close()


class FastLaneSite(web.BaseSite):
    """An aiohttp site whose connections start in the fast lane (a listening socket, or host and port)."""

    __slots__ = ("_lane", "_sock", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, lane: FastLane, *, sock: Any = None, host: str | None = None,
                 port: int | None = None) -> None:
        super().__init__(runner)
        self._lane, self._sock, self._host, self._port = lane, sock, host, port

    @property
    def name(self) -> str:
        return f"fast lane on {self._host}:{self._port}" if self._sock is None else f"fast lane on {self._sock!r}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        if self._sock is not None:
            self._server = await loop.create_server(self._lane, sock=self._sock, backlog=self._backlog)
        else:
            self._server = await loop.create_server(self._lane, self._host, self._port, reuse_address=True,
                                                    backlog=self._backlog)
