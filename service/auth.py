"""Optional bearer-token authentication: `Authorization: Bearer <key>` checked against the configured keys.

Keys come from `BN_SERVE_API_KEY` (one key) and/or `BN_SERVE_API_KEYS_FILE` (one key per line; blank lines
and lines starting with `#` skipped). With no key configured the server is open. Health routes
(`/v2/health/*`) and `/metrics` are always open so that probes and scrapers need no secret, and so is the
static `/openapi.json`; every other path, present, future or unknown, is protected (deny by default). The
check runs in `service.front` before any routing, so without a token nothing about the routes or models
leaks, not even whether one exists.

The comparison takes the same time whichever key matches, or none: the token and every key are hashed to
32 bytes (so no length leaks), and `hmac.compare_digest` runs against all keys without stopping early.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from service.errors import ConfigurationError, Forbidden, Unauthorized

OPEN_PATHS = frozenset({"/metrics", "/openapi.json"})
OPEN_PREFIXES = ("/v2/health/",)


def load_api_keys(api_key: str | None, api_keys_file: Path | None) -> list[str]:
    """The configured keys; raises `ConfigurationError` for an unreadable or empty file or a blank key."""
    keys = []
    if api_key is not None:
        if not api_key.strip():
            raise ConfigurationError("api_key is blank; unset it to serve without authentication")
        keys.append(api_key.strip())
    if api_keys_file is not None:
        try:
            lines = api_keys_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"cannot read api_keys_file {api_keys_file}: {exc}") from None
        from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not from_file:
            raise ConfigurationError(f"api_keys_file {api_keys_file} holds no key (one key per line)")
        keys.extend(from_file)
    return keys


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class Authenticator:
    """Checks `Authorization` headers against `keys`; with no keys every request passes."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [_digest(key) for key in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    @staticmethod
    def is_open(path: str) -> bool:
        """Whether `path` is served without a token (health probes and metrics)."""
        return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)

    def check(self, path: str, authorization: str | None) -> None:
        """Raise `Unauthorized` (no bearer token) or `Forbidden` (no key matches) for a protected `path`."""
        if not self._digests or self.is_open(path):
            return
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("this route needs an API key: send the header 'Authorization: Bearer <key>'")
        digest = _digest(token)
        matched = False
        for key in self._digests:  # every key, no early exit: the time does not say which one matched
            matched |= hmac.compare_digest(digest, key)
        if not matched:
            raise Forbidden("the API key is not valid for this server")
