"""Browser logins: single-use links (``vmmesh web``) traded for session cookies.

A browser cannot easily present a client certificate, so, as Jupyter and
Cockpit do, whoever may use this host's control socket asks the node for a
login link (``web.login``): a random token, good once and for ``TOKEN_TTL``
seconds.  Visiting ``/login?token=...`` spends it and sets a session cookie
(random, ``HttpOnly; Secure; SameSite=Strict``, ``SESSION_TTL`` seconds),
which is then worth a viewer certificate.  Pure: the clock is passed in.

Both live only in this node's memory, keyed by the SHA-256 of the secret (a
dict lookup then says nothing of the secret through its timing), and both
are bounded: the oldest goes when a new one would exceed ``MAX_TOKENS`` or
``MAX_SESSIONS``.  A node restart logs everyone out.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

TOKEN_TTL = 300.0  # seconds a login link is good for
SESSION_TTL = 12 * 3600.0  # seconds a browser session lasts
MAX_TOKENS = 64
MAX_SESSIONS = 256
COOKIE = "vmmesh_session"


def _key(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "replace")).digest()


@dataclass
class Logins:
    """Outstanding login tokens and open sessions of one node."""

    clock: Callable[[], float] = time.monotonic
    token_ttl: float = TOKEN_TTL
    session_ttl: float = SESSION_TTL
    cookie_name: str = COOKIE
    _tokens: dict[bytes, float] = field(default_factory=dict)  # key -> expiry
    _sessions: dict[bytes, float] = field(default_factory=dict)

    def new_token(self) -> str:
        """A fresh single-use login token."""
        token = secrets.token_urlsafe(32)
        _put(self._tokens, _key(token), self.clock() + self.token_ttl, MAX_TOKENS)
        return token

    def redeem(self, token: str) -> str | None:
        """Spend ``token`` (once, before it expires): a new session's cookie value, else None."""
        expires = self._tokens.pop(_key(token), None)
        now = self.clock()
        if expires is None or now >= expires:
            return None
        session = secrets.token_urlsafe(32)
        _put(self._sessions, _key(session), now + self.session_ttl, MAX_SESSIONS)
        return session

    def valid(self, session: str) -> bool:
        """Whether ``session`` (a cookie's value) is open; an expired one is dropped."""
        key = _key(session)
        expires = self._sessions.get(key)
        if expires is None:
            return False
        if self.clock() >= expires:
            del self._sessions[key]
            return False
        return True

    def set_cookie(self, session: str) -> str:
        """The ``Set-Cookie`` value for a new session: script-proof, HTTPS only, this site only."""
        return (
            f"{self.cookie_name}={session}; Path=/; Max-Age={int(self.session_ttl)}; "
            "HttpOnly; Secure; SameSite=Strict"
        )

    def session_of(self, cookie_headers: list[str]) -> str | None:
        """Our cookie's value among ``Cookie`` headers, if any."""
        for header in cookie_headers:
            for part in header.split(";"):
                name, sep, value = part.strip().partition("=")
                if sep and name == self.cookie_name:
                    return value
        return None


def _put(table: dict[bytes, float], key: bytes, expires: float, limit: int) -> None:
    table[key] = expires
    while len(table) > limit:  # dicts keep insertion order: the first is the oldest
        del table[next(iter(table))]
