"""The senders API on the HTTP listener: ``GET /v1/senders?login=L`` and its OpenAPI description.

For a webmail identity plugin or a provisioning script on a private network: it answers with
exactly the JSON of `policyd senders --json`. Off by default; when on, every request needs the
bearer token from ``senders_api_token_file`` (compared in constant time), and all clients
together get ``senders_api_rate`` requests a second (bursts of ``senders_api_burst``).
The token never appears in a reply, a log line or a metric.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from policyd import defaults
from policyd.http import Response
from policyd.model import LoadError, Problem, StoreUnavailable
from policyd.senders import FIELDS, SCHEMA_VERSION, list_senders
from policyd.service import Service
from policyd.stores.network import read_secret

log = logging.getLogger("policyd.http")

JSON = "application/json"
MAX_LOGIN = defaults.SENDERS_API_MAX_LOGIN


def _error(status: str, message: str, *headers: tuple[str, str]) -> Response:
    return Response(status, JSON, json.dumps({"error": message}).encode(), headers)


def read_token(path: Path) -> str:
    """The bearer token: the first line of its file. Errors name the setting and the file,
    never what is in it."""
    token = read_secret(path, "senders_api_token_file").strip()
    if not token:
        raise LoadError([Problem("senders_api_token_file", 0, f"{path} is empty")])
    return token


class TokenBucket:
    """``rate`` requests a second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.tokens = float(burst)
        self.last = clock()

    def take(self) -> float:
        """0 if a request may go now, else how many seconds until one may."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class SendersApi:
    """Answers /v1/senders and /v1/openapi.json for the HTTP listener."""

    def __init__(
        self,
        service: Service,
        token: str,
        *,
        rate: float = defaults.SENDERS_API_RATE,
        burst: int = defaults.SENDERS_API_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self._token = token.encode()
        self.bucket = TokenBucket(rate, burst, clock)

    async def respond(self, method: str, target: str, headers: dict[str, str]) -> Response:
        path, _, query = target.partition("?")
        if path == "/v1/openapi.json":
            if method != "GET":
                return _error("405 Method Not Allowed", "GET only", ("Allow", "GET"))
            return Response("200 OK", JSON, OPENAPI_BYTES)
        if path != "/v1/senders":
            return _error("404 Not Found", "not found: try /v1/senders or /v1/openapi.json")
        if method != "GET":
            return _error("405 Method Not Allowed", "GET only", ("Allow", "GET"))
        wait = self.bucket.take()
        if wait > 0:
            retry = ("Retry-After", str(math.ceil(wait)))
            return _error("429 Too Many Requests", "rate limit: try again later", retry)
        if not self._authorized(headers.get("authorization", "")):
            challenge = ("WWW-Authenticate", 'Bearer realm="policyd"')
            return _error("401 Unauthorized", "a valid bearer token is needed", challenge)
        login = _login(query)
        if isinstance(login, Response):
            return login
        try:
            listing = await list_senders(self.service, login)
        except StoreUnavailable as error:
            log.warning("senders: %s", error)
            return _error("503 Service Unavailable", "a map could not answer", ("Retry-After", "5"))
        return Response("200 OK", JSON, json.dumps(listing.to_json()).encode())

    def _authorized(self, header: str) -> bool:
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Constant time: how much of a guess is right must not show in how long it takes.
        return hmac.compare_digest(given.strip().encode("latin-1"), self._token)


def _login(query: str) -> str | Response:
    """The one ``login`` parameter, or a 400 saying what is wrong with the query."""
    try:
        fields = urllib.parse.parse_qs(
            query,
            keep_blank_values=True,
            strict_parsing=bool(query),
            errors="strict",
            max_num_fields=4,
        )
    except (ValueError, UnicodeDecodeError):
        return _error("400 Bad Request", "malformed query: expected login=LOGIN")
    unknown = sorted(set(fields) - {"login"})
    if unknown:
        return _error("400 Bad Request", f"unknown parameter: {unknown[0][:40]}")
    values = fields.get("login", [])
    if len(values) != 1:
        return _error("400 Bad Request", "expected exactly one login parameter")
    login = values[0]
    if not login or len(login) > MAX_LOGIN:
        return _error("400 Bad Request", f"login: 1 to {MAX_LOGIN} characters")
    if any(ch < " " or ch == "\x7f" for ch in login):
        return _error("400 Bad Request", "login: control characters are not allowed")
    return login


def _item_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["sender", "reason", "rule", "explanation"],
        "additionalProperties": False,
        "properties": {
            "sender": {
                "type": "string",
                "description": "an address, @domain, a pattern as written, or *",
            },
            "reason": {
                "type": "string",
                "description": "the decision's reason word (owner, grant, catch_all, ...)",
            },
            "rule": {
                "type": "string",
                "nullable": True,
                "description": "where the right comes from: file:line, an LDAP DN, an SQL query",
            },
            "explanation": {"type": "string"},
            "syntax": {
                "type": "string",
                "enum": ["pcre", "regexp", "glob", "extension"],
                "description": "patterns only: how the pattern is written",
            },
        },
    }


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.0 description of the senders API, served at /v1/openapi.json."""
    items = {"type": "array", "items": {"$ref": "#/components/schemas/Item"}}
    strings = {"type": "array", "items": {"type": "string"}}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "policyd senders API",
            "version": str(SCHEMA_VERSION),
            "description": "Every envelope sender a SASL login may use, and the rule for each:"
            " the JSON of `policyd senders --json`.",
        },
        "paths": {
            "/v1/senders": {
                "get": {
                    "operationId": "listSenders",
                    "summary": "What LOGIN may send as",
                    "security": [{"bearer": []}],
                    "parameters": [
                        {
                            "name": "login",
                            "in": "query",
                            "required": True,
                            "description": "the SASL login, as Postfix's sasl_username has it",
                            "schema": {
                                "type": "string",
                                "minLength": 1,
                                "maxLength": MAX_LOGIN,
                                "pattern": "^[^\\u0000-\\u001f\\u007f]+$",
                            },
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "the listing",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Listing"}
                                }
                            },
                        },
                        "400": {"description": "malformed query", "content": error},
                        "401": {"description": "no or a wrong bearer token", "content": error},
                        "429": {"description": "rate limit reached", "content": error},
                        "503": {"description": "a map could not answer", "content": error},
                    },
                }
            }
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
                "Item": _item_schema(),
                "Listing": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": list(FIELDS),
                    "properties": {
                        "version": {"type": "integer", "enum": [SCHEMA_VERSION]},
                        "login": {"type": "string"},
                        "names": {**strings, "description": "the names that count as the login"},
                        "mode": {"type": "string"},
                        "complete": {"type": "boolean"},
                        "incomplete": {**strings, "description": "why something may be missing"},
                        "exact": {**items, "description": "addresses, each checked"},
                        "domains": {**items, "description": "whole domains (@domain)"},
                        "patterns": {**items, "description": "patterns that cannot be listed"},
                        "everything": {**items, "description": "rules that allow any sender"},
                        "denied": {**items, "description": "taken away by a deny rule"},
                        "notes": strings,
                    },
                },
            },
        },
    }


OPENAPI_BYTES = json.dumps(openapi(), indent=2).encode()
