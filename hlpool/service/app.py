"""The aiohttp application: the route table's handlers behind the error and bearer-token middleware.

Every error leaves as ``{"error": {"code", "message"[, "details"]}}`` with its
code's status (aiohttp's own 404/405/413 included); unexpected exceptions are
logged and answered 500 ``internal`` without their text. With a token, every
route but /healthz needs ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import hmac
import logging
import sys
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from hlpool.service.api_errors import ApiError, ClientGone, http_error
from hlpool.service.config import ServerConfig
from hlpool.service.handlers import Service, json_response
from hlpool.service.routes import ROUTES

log = logging.getLogger("hlpool.server")

_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"))


def server_options(config: ServerConfig) -> dict[str, Any]:
    """The options of aiohttp's connection handler (``web.AppRunner(app, **server_options(config))``).

    Headers must arrive within ``header_timeout`` seconds of the connection's start or of the previous
    answer: aiohttp closes a connection still waiting for headers when its keep-alive timer fires (so an
    idle kept-alive connection closes after as long). A body must arrive within ``body_timeout``
    (:meth:`Service._read_body`); after an answer that did not read the whole body, aiohttp reads (and
    drops) the rest for at most as long again before it closes the connection.
    """
    return {"keepalive_timeout": config.header_timeout, "lingering_time": min(config.body_timeout, 10.0),
            "logger": _ClientErrorLog(logging.getLogger("aiohttp.server"), {})}


# What a client causes on its own connection: a malformed request line, header, chunk or compressed body,
# a connection closed or reset under the server.
_CLIENT_ERRORS = (HttpProcessingError, RequestPayloadError, ConnectionError)


class _ClientErrorLog(logging.LoggerAdapter):
    """aiohttp's server log, where what a client did to its own connection (:data:`_CLIENT_ERRORS`, also
    met while aiohttp drains a body nobody read) is one DEBUG line rather than an ERROR with a traceback."""

    def exception(self, msg: Any, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        error = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(error, _CLIENT_ERRORS):
            self.debug("%s: %s", msg % args if args else msg, str(error).replace("\n", " "))
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


def routes(service: Service) -> list[tuple[str, str, Any]]:
    """(method, path, handler) of every route (:data:`~hlpool.service.routes.ROUTES`)."""
    return [(route.method, route.path, getattr(service, route.handler)) for route in ROUTES]


def make_app(service: Service) -> web.Application:
    token = _header_bytes(service.config.token) if service.config.token else None
    public = {route.path for route in ROUTES if route.public}
    frontend = service.frontend

    # One middleware (each one is a coroutine layer on every request): the token check, then the handler,
    # every error as a JSON answer.
    @web.middleware
    async def errors(request: web.Request, handler) -> web.StreamResponse:
        try:
            if token and request.path not in public:
                check_token(request)
            response = await handler(request)
        except ApiError as exc:
            response = error_response(service, exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = error_response(service, http_error(exc.status, exc.reason, service.config.max_body,
                                                          exc.headers))
        except ClientGone:  # nobody to answer; the (unsent) answer only closes the books
            log.debug("%s %r: the client closed the connection before sending its body", request.method,
                      request.path)
            response = error_response(service, ApiError("bad_request", "the client closed the connection"))
        except Exception as exc:  # a bug: log it, answer with a JSON 500
            log.exception("unhandled error in %s %s", request.method, request.path)
            response = error_response(service, ApiError("internal", f"internal server error "
                                                                    f"({type(exc).__name__})"))
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        method = request.method if request.method in _METHODS else "other"  # a label a client cannot grow
        service.metrics.count_request(method, route, response.status)
        if frontend is not None:
            response.headers["X-Hlpool-Frontend"] = frontend
        return response

    def check_token(request: web.Request) -> None:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(_header_bytes(value.strip()), token):
            raise ApiError("unauthorized", "missing or wrong bearer token (send Authorization: Bearer TOKEN)",
                           headers={"WWW-Authenticate": 'Bearer realm="hlpool"'})

    app = web.Application(middlewares=[errors], client_max_size=service.config.max_body)
    for method, path, handler in routes(service):
        app.router.add_route(method, path, handler)
    return app


def error_response(service: Service, error: ApiError) -> web.Response:
    service.metrics.errors.labels(error.code).inc()
    response = json_response(error.body(), status=error.status, headers=error.headers)
    if error.headers.get("Connection") == "close":
        response.force_close()  # e.g. a body that did not arrive in time: this connection is done
    return response


def _header_bytes(value: str) -> bytes:
    """A header value as the client sent it (bytes that are not UTF-8 arrive as surrogate escapes)."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return b"\xff"  # matches no token (a token is text)
