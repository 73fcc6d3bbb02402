"""The web page and the offline API docs: static files read once from the package and served from memory,
Swagger UI's assets from fastapi-offline, and the security headers every response carries.

Which page route serves which file is in routes.py; what a file says is in static/.
"""
from __future__ import annotations

import os
from importlib import resources

__all__ = ["load_static", "load_swagger_assets", "DOCS_UNAVAILABLE", "SecurityHeaders"]

Assets = dict[str, tuple[bytes, str]]  # file name → (content, media type)

_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}


def load_static() -> Assets:
    files = {}
    root = resources.files("imgrec.serve") / "static"
    for entry in root.iterdir():
        suffix = os.path.splitext(entry.name)[1]
        if entry.is_file() and suffix in _MEDIA_TYPES:
            files[entry.name] = (entry.read_bytes(), _MEDIA_TYPES[suffix])
    return files


def load_swagger_assets() -> Assets:
    """Swagger UI's script and stylesheet from the fastapi-offline package, when it is installed.

    FastAPI's own /docs page loads them from a CDN, which fails offline; fastapi-offline ships the same
    swagger-ui-dist@5 files (version 5 is needed to read FastAPI's OpenAPI 3.1 schema).
    """
    try:
        root = resources.files("fastapi_offline") / "static"
        return {"swagger-ui-bundle.js": ((root / "swagger-ui-bundle.js").read_bytes(), _MEDIA_TYPES[".js"]),
                "swagger-ui.css": ((root / "swagger-ui.css").read_bytes(), _MEDIA_TYPES[".css"])}
    except (ModuleNotFoundError, FileNotFoundError, OSError):
        return {}


DOCS_UNAVAILABLE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>imgrec API</title>
<link rel="stylesheet" href="/static/style.css"></head><body><main class="page"><h1>imgrec API</h1>
<p>The interactive documentation needs the <code>fastapi-offline</code> package, which ships Swagger UI for use
without internet access: <code>pip install 'imgrec[serve]'</code>.</p>
<p>The machine-readable schema is at <a href="/openapi.json">/openapi.json</a>.</p></main></body></html>"""

# The page and the docs run only scripts from this server; uploads are shown from blob: URLs.
_CSP = ("default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_DOCS_CSP = _CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")  # Swagger UI injects styles


class SecurityHeaders:
    """Plain ASGI middleware (cheaper than BaseHTTPMiddleware on every request): hardening headers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        csp = (_DOCS_CSP if scope["path"] == "/docs" else _CSP).encode()

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [
                    (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"), (b"content-security-policy", csp),
                    (b"cache-control", b"no-store")]
            await send(message)

        await self.app(scope, receive, send_with_headers)
