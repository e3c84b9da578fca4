"""The aiohttp application: the route table's handlers behind the error and bearer-token middleware.

Every error leaves as ``{"error": {"code", "message"[, "details"]}}`` with its
code's status (aiohttp's own 404/405/413 included); unexpected exceptions are
logged and answered 500 ``internal`` without their text. With a token, every
route but /healthz needs ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from aiohttp import web

from hlpool.service.api_errors import ApiError, http_error
from hlpool.service.handlers import Service, json_response
from hlpool.service.routes import ROUTES

log = logging.getLogger("hlpool.server")


def routes(service: Service) -> list[tuple[str, str, Any]]:
    """(method, path, handler) of every route (:data:`~hlpool.service.routes.ROUTES`)."""
    return [(route.method, route.path, getattr(service, route.handler)) for route in ROUTES]


def make_app(service: Service) -> web.Application:
    token = service.config.token
    public = {route.path for route in ROUTES if route.public}

    @web.middleware
    async def errors(request: web.Request, handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except ApiError as exc:
            response = error_response(service, exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = error_response(service, http_error(exc.status, exc.reason, service.config.max_body))
        except Exception as exc:  # a bug: log it, answer with a JSON 500
            log.exception("unhandled error in %s %s", request.method, request.path)
            response = error_response(service, ApiError("internal", f"internal server error "
                                                                    f"({type(exc).__name__})"))
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        service.metrics.http_requests.labels(request.method, route, str(response.status)).inc()
        return response

    @web.middleware
    async def auth(request: web.Request, handler) -> web.StreamResponse:
        if token and request.path not in public:
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                raise ApiError("unauthorized", "missing or wrong bearer token (send Authorization: Bearer TOKEN)",
                               headers={"WWW-Authenticate": 'Bearer realm="hlpool"'})
        return await handler(request)

    app = web.Application(middlewares=[errors, auth], client_max_size=service.config.max_body)
    for method, path, handler in routes(service):
        app.router.add_route(method, path, handler)
    return app


def error_response(service: Service, error: ApiError) -> web.Response:
    service.metrics.errors.labels(error.code).inc()
    return json_response(error.body(), status=error.status, headers=error.headers)
