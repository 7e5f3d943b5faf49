"""The public Tinker HTTP protocol (``/api/v1``), so that the official ``tinker`` SDK and
``tinker-cookbook`` run unchanged against ``tinker-server``. See ``docs/compat.md``."""

from tinker_backend.compat.routes import add_routes

__all__ = ["add_routes"]
