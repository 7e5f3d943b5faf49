"""API keys: who is calling, on both protocols.

Every route but ``GET /api/v1/healthz`` needs a valid key in the ``X-API-Key`` header (the
header the Tinker SDK sends; ``Authorization: Bearer <key>`` works too). A key maps to an
*owner*, the tenant whose sessions, runs, samplers and checkpoints it may see and touch.

Keys come from three places, all active at once:

* ``tinker-server --api-key KEY`` (repeatable): the owner is ``key-<key id>``;
* a keys file (``--keys-file``): one ``KEY [OWNER]`` per line, ``#`` starts a comment; it is
  re-read when it changes, so deleting a line revokes that key;
* the ``api_keys`` table of the store, managed with ``tinker-server keys create|list|revoke``
  (only a SHA-256 hash is stored; keys are 256-bit random, so a slow hash would add nothing).

When none is configured the server is open and everything belongs to the owner ``local``,
as in the embedded backend (``tinker-server`` refuses to start that way on a non-loopback
address unless told ``--allow-no-auth``). Revoking or adding a key takes effect on the next
request, also for WebSockets that are already open.

The one function other routes need is :func:`authenticate` (``request -> owner``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from aiohttp import web

from tinker_backend.store import Store

__all__ = [
    "KEYRING_KEY",
    "LOCAL_OWNER",
    "PUBLIC_PATHS",
    "KeyRing",
    "auth_middleware",
    "authenticate",
    "generate_key",
    "hash_key",
    "key_id",
]

logger = logging.getLogger("tinker_backend.auth")

LOCAL_OWNER = "local"
KEY_PREFIX = "tml-"  # the official SDK refuses keys without it
# The signed checkpoint-file URLs carry their permission in their signature (files_api).
# The console's pages and static files carry no data (its JSON under /console/api/ needs a key).
PUBLIC_PATHS = frozenset({"/api/v1/healthz", "/api/v1/checkpoint_file", "/console", "/console/"})
PUBLIC_PREFIXES = ("/console/static/",)
_OWNER = "tinker_owner"  # where authenticate() caches the owner on the request


def generate_key() -> str:
    """A new random key, ``tml-`` and 43 url-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key: str) -> str:
    """A short public name of a key (the first 12 hex digits of its hash), for listing and revoking."""
    return hash_key(key)[:12]


class KeyRing:
    """All valid keys: command-line ones, a keys file and the store's table."""

    def __init__(self, store: Store, api_keys: Iterable[str] = (), keys_file: Path | None = None) -> None:
        self._store = store
        self._static = {hash_key(k): f"key-{key_id(k)}" for k in api_keys}
        self._file = keys_file
        self._file_mtime: float | None = None
        self._file_keys: dict[str, str] = {}
        if keys_file is not None:
            self._reload_file()  # a missing or unreadable file fails at startup, not per request

    def _reload_file(self) -> None:
        assert self._file is not None
        mtime = os.stat(self._file).st_mtime
        if mtime == self._file_mtime:
            return
        keys = {}
        for number, line in enumerate(self._file.read_text().splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) > 2:
                raise ValueError(f"{self._file}:{number}: expected 'KEY [OWNER]', got {len(fields)} fields")
            keys[hash_key(fields[0])] = fields[1] if len(fields) == 2 else f"key-{key_id(fields[0])}"
        self._file_keys, self._file_mtime = keys, mtime

    def _file_lookup(self) -> dict[str, str]:
        if self._file is None:
            return {}
        try:
            self._reload_file()
        except (OSError, ValueError) as e:  # keep the last good keys rather than lock everyone out
            logger.error("keys file %s: %s (keeping the keys read before)", self._file, e)
        return self._file_keys

    def required(self) -> bool:
        """Whether any key is configured (otherwise the server is open, owner ``local``)."""
        return bool(self._static or self._file_lookup() or self._store.has_active_keys())

    def owner(self, key: str) -> str | None:
        """The owner of ``key``, or None if it is not a valid key."""
        digest = hash_key(key)
        return self._static.get(digest) or self._file_lookup().get(digest) or self._store.key_owner(digest)


KEYRING_KEY = web.AppKey("keyring", KeyRing)


def request_key(request: web.Request) -> str | None:
    key = request.headers.get("X-API-Key")
    if key is None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else None
    return key or None


def authenticate(request: web.Request) -> str:
    """The owner of the request's API key; raises ``401`` (naming the header) if it has none.

    Cheap to call again: the owner is cached on the request.
    """
    if _OWNER in request:
        return str(request[_OWNER])
    keyring = request.app[KEYRING_KEY]
    if not keyring.required():
        owner = LOCAL_OWNER
    else:
        key = request_key(request)
        if key is None:
            raise _unauthorized(request, "expected an API key, got none")
        found = keyring.owner(key)
        if found is None:
            raise _unauthorized(request, f"expected a valid API key, got an unknown or revoked key {key[:8]!r}...")
        owner = found
    request[_OWNER] = owner
    return owner


def still_valid(request: web.Request) -> bool:
    """Whether the key that opened a long-lived connection is still valid (not revoked since)."""
    keyring = request.app[KEYRING_KEY]
    if not keyring.required():
        return request.get(_OWNER) == LOCAL_OWNER
    key = request_key(request)
    return key is not None and keyring.owner(key) == request.get(_OWNER)


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Authenticate every request but the public ones before any handler runs."""
    if request.path not in PUBLIC_PATHS and not request.path.startswith(PUBLIC_PREFIXES):
        authenticate(request)
    return await handler(request)


def _unauthorized(request: web.Request, problem: str) -> web.HTTPUnauthorized:
    """A 401 naming the header: ``X-API-Key``, or ``Authorization`` (Bearer) with an OpenAI-shaped
    body on the OpenAI-compatible routes (``/v1/...``)."""
    body: dict[str, object]
    if request.path.startswith("/v1/"):
        error = {"message": f"Authorization: {problem}", "type": "invalid_request_error", "param": None}
        body = {"error": {**error, "code": "invalid_api_key"}}
        challenge = "Bearer"
    else:
        body, challenge = {"error": f"X-API-Key: {problem}", "category": "user"}, 'ApiKey header="X-API-Key"'
    return web.HTTPUnauthorized(
        text=web.json_response(body).text,
        content_type="application/json",
        headers={"WWW-Authenticate": challenge},
    )
