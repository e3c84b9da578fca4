"""The OpenAPI 3.1 document (``GET /openapi.json``), derived from the route table and the body structs.

Schemas come from :func:`msgspec.json.schema_components` of the structs in
:mod:`.schema`, operations from :data:`.routes.ROUTES`, error responses from
:data:`.api_errors.ERROR_STATUS`; nothing here describes a body by hand.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from hlpool.service.api_errors import ERROR_STATUS
from hlpool.service.config import ServerConfig
from hlpool.service.routes import PATH_PARAMETERS, ROUTES, Route
from hlpool.service.schema import UPLOAD_TYPES, VALUE_DOC, Error, SnapshotName
from hlpool.version import __version__

REF_TEMPLATE = "#/components/schemas/{name}"
_PARAMETER = re.compile(r"\{(\w+)\}")


def openapi_document(config: ServerConfig | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 description of :data:`~hlpool.service.routes.ROUTES` as served with ``config``."""
    config = config or ServerConfig()
    # One schema_components call for every type the routes use: structs become shared components.
    types: list[Any] = [Error, SnapshotName, *PATH_PARAMETERS.values()]
    for route in ROUTES:
        types += [route.response, *route.request]
    refs, components = msgspec.json.schema_components(types, ref_template=REF_TEMPLATE)
    schema_of = dict(zip(map(_key, types), refs))

    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, config, schema_of)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "hlpool", "version": __version__,
                 "description": "Call functions of guests running in KVM micro-VM sandboxes. Every call starts "
                                "from the guest's snapshot. " + VALUE_DOC},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {"schemas": components},
    }
    if config.token:  # as app.auth enforces it: every route but the public ones (security: [] there)
        document["security"] = [{"bearer": []}]
        document["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "this server runs with --token"}}
    return document


def _key(t: Any) -> Any:
    return repr(t)  # Annotated[...] types are not always hashable; their repr is distinct


def _operation(route: Route, config: ServerConfig, schema_of: dict[Any, dict]) -> dict[str, Any]:
    def content(schema: dict) -> dict:
        return {route.media_type: {"schema": schema}}

    body = schema_of[_key(route.response)]
    responses: dict[str, Any] = {str(route.status): {"description": route.response_description,
                                                     "content": content(body)}}
    for status, description in route.other_statuses:
        responses[str(status)] = {"description": description, "content": content(body)}
    guarded = bool(config.token) and not route.public
    responses.update(_error_responses((*route.errors, "unauthorized") if guarded else route.errors,
                                      schema_of[_key(Error)]))
    operation: dict[str, Any] = {"summary": route.summary, "operationId": route.operation_id}
    if config.token and route.public:
        operation["security"] = []
    if route.description:
        operation["description"] = route.description.format(call_timeout=config.call_timeout,
                                                            max_body=config.max_body)
    parameters = [{"name": name, "in": "path", "required": True,
                   "schema": schema_of[_key(PATH_PARAMETERS[name])]} for name in _PARAMETER.findall(route.path)]
    if parameters:
        operation["parameters"] = parameters
    if route.request or route.upload:
        request_content: dict[str, Any] = {}
        if route.request:
            schemas = [schema_of[_key(t)] for t in route.request]
            request_content["application/json"] = {"schema": schemas[0] if len(schemas) == 1
                                                    else {"oneOf": schemas}}
        if route.upload:
            for media_type in UPLOAD_TYPES:
                request_content[media_type] = {"schema": {"type": "string", "format": "binary"},
                                               "description": "a guest ELF (hlpool guest build)"}
        operation["requestBody"] = {"required": route.request_required, "content": request_content}
    operation["responses"] = responses
    return operation


def _error_responses(codes: tuple[str, ...], error_schema: dict) -> dict[str, Any]:
    by_status: dict[str, list[str]] = {}
    for code in codes:
        by_status.setdefault(str(ERROR_STATUS[code]), []).append(code)
    return {status: {"description": "error: " + ", ".join(names),
                     "content": {"application/json": {"schema": error_schema}}}
            for status, names in sorted(by_status.items())}
