"""Signed download URLs of checkpoint files, and the GET route that serves them.

``RestClient.get_external_weights_urls`` (and the official CLI's ``tinker checkpoint download``)
gets one URL per file of a checkpoint::

    {base}/api/v1/checkpoint_file?path=<tinker path>&file=<relative path>&expires=<unix s>&signature=<hex>

``signature`` is an HMAC-SHA256, with a secret kept in ``<data_dir>/url_signing.key`` (made on
first use, mode 0600), over ``path``, ``file`` and ``expires``. The route needs no API key: the
signature is the permission, given by whoever could read the checkpoint when it was signed.
It answers 403 for a signature that does not match, 410 once ``expires`` has passed or the
checkpoint is gone (deleted or expired), 404 for a file the checkpoint does not hold.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from tinker.validation import parse_tinker_path
from tinker_backend.errors import ServiceError

if TYPE_CHECKING:
    from tinker_backend.request_handler import RequestHandler

ROUTE = "/api/v1/checkpoint_file"
URL_TTL_S = 3600  # how long a signed URL stays valid
_KEY_FILE = "url_signing.key"


class UrlSigner:
    """Signs and checks download URLs with the data dir's secret."""

    def __init__(self, data_dir: Path) -> None:
        self._key_path = data_dir / _KEY_FILE
        self._key: bytes | None = None

    def _secret(self) -> bytes:
        if self._key is None:
            if not self._key_path.exists():
                temporary = self._key_path.with_suffix(f".{secrets.token_hex(6)}.tmp")
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32))
                try:  # another process may have made it first: the first one wins
                    os.link(temporary, self._key_path)
                except FileExistsError:
                    pass
                temporary.unlink()
            self._key = bytes.fromhex(self._key_path.read_text().strip())
        return self._key

    def signature(self, tinker_path: str, file: str, expires: int) -> str:
        message = f"{tinker_path}\n{file}\n{expires}".encode()
        return hmac.new(self._secret(), message, hashlib.sha256).hexdigest()

    def url(self, tinker_path: str, file: str, expires: int, base_url: str | None) -> str:
        """The signed URL of one file; relative to the server without ``base_url``."""
        query = urllib.parse.urlencode(
            {
                "path": tinker_path,
                "file": file,
                "expires": expires,
                "signature": self.signature(tinker_path, file, expires),
            }
        )
        return f"{(base_url or '').rstrip('/')}{ROUTE}?{query}"

    def check(self, tinker_path: str, file: str, expires: str, signature: str) -> None:
        """403 unless the signature matches; 410 once the URL has expired."""
        if not expires.isdigit() or not hmac.compare_digest(
            self.signature(tinker_path, file, int(expires)), signature
        ):
            raise ServiceError(403, "signature: expected the signature this server gave with the URL, got another")
        if int(expires) <= time.time():
            raise ServiceError(410, f"expires: this URL expired at {int(expires)} (unix time); ask for a new one")


def add_routes(app: web.Application, backend_key: web.AppKey[RequestHandler]) -> None:
    """Serve ``GET /api/v1/checkpoint_file`` on ``app`` (public in ``auth``: the URL is signed)."""
    from tinker_backend.compat.bodies import errors_as_json  # the compat package imports the backend

    async def checkpoint_file(request: web.Request) -> web.StreamResponse:
        query = request.query
        missing = [name for name in ("path", "file", "expires", "signature") if name not in query]
        if missing:
            raise ServiceError(403, f"{', '.join(missing)}: expected a signed URL's query parameters, got none")
        backend = request.app[backend_key]
        backend.checkpoints.signer.check(query["path"], query["file"], query["expires"], query["signature"])
        run_id, kind, name = parse_tinker_path(query["path"])
        record = backend.store.get_checkpoint(run_id, kind, name)
        if record is None:
            raise ServiceError(410, f"path: checkpoint {query['path']!r} was deleted or has expired")
        folder = backend.checkpoints.directory(record).resolve()
        target = (folder / query["file"]).resolve()
        if not target.is_relative_to(folder) or not target.is_file():
            raise ServiceError(404, f"file: checkpoint {query['path']!r} has no file {query['file']!r}")
        return web.FileResponse(target)

    app.router.add_get(ROUTE, errors_as_json(checkpoint_file))
