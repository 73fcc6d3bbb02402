"""Host and Origin checks: a web page the user visits must not drive the local server.

Two attacks reach a server on 127.0.0.1 from a browser:

- **DNS rebinding**: a page on ``evil.example`` makes its name resolve to 127.0.0.1, then reads the
  server's answers as same-origin. Its requests carry ``Host: evil.example``: refused (403) unless the host
  is this machine's loopback name or address (127.0.0.1, localhost, [::1]), the address the server listens
  on, or one given with ``--allow-host``. An IP address cannot be rebound, so a server listening on every
  address (0.0.0.0, ::) also answers any IP address given as the host; names still need ``--allow-host``.
- **Cross-site requests**: a page on another origin can POST a form or a ``fetch`` to the server (the
  browser sends it, only the reading of the answer is blocked) and have it run the model. A request whose
  ``Origin`` is not this server's own (the scheme, host and port it was reached at) is refused (403) unless
  the origin is given with ``--allow-origin``; those get the CORS headers that let their pages read the answer.

Jupyter and Vite check the same two headers. A request without an Origin (curl, scripts, a same-origin GET)
is a request from something that is not a web page of another site. ``"*"`` in either list turns that check off.
"""
from __future__ import annotations

import ipaddress
import json
from urllib.parse import urlsplit

__all__ = ["LOCAL_HOSTS", "HostOriginGuard", "HostPolicy", "check_origin_spec"]

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
ANY_ADDRESS = ("0.0.0.0", "::", "")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def split_host(value: str, scheme: str = "http") -> tuple[str, int] | None:
    """``Host`` header value → (lower-case host name or address without brackets, port); None if malformed."""
    try:
        parts = urlsplit(f"{scheme}://{value}")
        name, port = parts.hostname, parts.port
    except ValueError:  # a port out of range or not a number, a bracket left open
        return None
    if not name or parts.path or parts.query or parts.fragment or parts.username is not None:
        return None
    return name.rstrip(".").lower(), port if port is not None else _DEFAULT_PORTS.get(scheme, 80)


def check_origin_spec(origin: str) -> str:
    """An ``--allow-origin`` value in canonical form (``scheme://host[:port]``, lower case), or "*"; ValueError
    naming what is wrong."""
    if origin == "*":
        return origin
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        raise ValueError(f"not an origin: {origin!r} (scheme://host[:port], e.g. https://app.example:8443)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username is not None:
        raise ValueError(f"not an origin: {origin!r} (scheme://host[:port], e.g. https://app.example:8443)")
    return _origin_key(parts.scheme, parts.hostname, port)


def _origin_key(scheme: str, host: str, port: int | None) -> str:
    port = port if port is not None else _DEFAULT_PORTS[scheme]
    host = host.rstrip(".").lower()
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostPolicy:
    """Which Host and Origin values a server answers (see the module docstring)."""

    def __init__(self, bound_host: str | None = None, allowed_hosts=(), allowed_origins=()):
        bound = (bound_host or "").strip("[]").lower()
        self.any_host = "*" in allowed_hosts
        self.any_ip = bound in ANY_ADDRESS and bound_host is not None
        self.hosts = {h.strip("[]").rstrip(".").lower() for h in (*LOCAL_HOSTS, bound, *allowed_hosts) if h}
        self.any_origin = "*" in allowed_origins
        self.origins = {check_origin_spec(o) for o in allowed_origins if o != "*"}

    def host_ok(self, name: str) -> bool:
        return self.any_host or name in self.hosts or (self.any_ip and _is_ip(name))

    def refusal(self, scope: dict, headers: dict[bytes, bytes]) -> tuple[str, bool]:
        """(why the request is refused, or "", whether its Origin is another one allowed: CORS headers)."""
        scheme = scope.get("scheme", "http")
        raw_host = headers.get(b"host", b"").decode("latin-1")
        host = split_host(raw_host, scheme) if raw_host else None
        if host is None:
            return "the request has no valid Host header", False
        if not self.host_ok(host[0]):
            return (f"host {host[0][:100]!r} is not this server's (DNS rebinding?); "
                    "start it with --allow-host NAME to answer that name"), False
        origin = headers.get(b"origin")
        if origin is None:
            return "", False
        origin = origin.decode("latin-1")
        try:
            key = check_origin_spec(origin)
        except ValueError:
            key = None
        if key is not None and key == _origin_key(scheme, host[0], host[1]):
            return "", False
        if self.any_origin or key in self.origins:
            return "", True
        return (f"cross-origin request from {origin[:100]!r} refused; start the server with --allow-origin "
                "ORIGIN to let that site's pages use it"), False


class HostOriginGuard:
    """Plain ASGI middleware: 403 with a JSON ``detail`` for a foreign Host or Origin (HostPolicy); CORS
    headers for an origin allowed with --allow-origin, and the answer to its preflight request."""

    def __init__(self, app, policy: HostPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        why, cors = self.policy.refusal(scope, headers)
        if why:
            return await _answer(send, 403, json.dumps({"detail": why}).encode(), [])
        if not cors:
            return await self.app(scope, receive, send)
        allow = [(b"access-control-allow-origin", headers[b"origin"]), (b"vary", b"Origin")]
        if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:  # a preflight
            return await _answer(send, 204, b"", allow + [
                (b"access-control-allow-methods", b"GET, POST"),
                (b"access-control-allow-headers", b"content-type, accept"), (b"access-control-max-age", b"600")])

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + allow
            await send(message)

        await self.app(scope, receive, send_with_cors)


async def _answer(send, status: int, body: bytes, headers: list) -> None:
    kind = [(b"content-type", b"application/json")] if body else []
    await send({"type": "http.response.start", "status": status,
                "headers": kind + [(b"content-length", str(len(body)).encode())] + headers})
    await send({"type": "http.response.body", "body": body})
