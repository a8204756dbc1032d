"""Join tokens this host issued, kept in sqlite so a token works exactly once.

Only the hash of a token's secret is stored.  Consuming is one transaction:
two joiners racing with the same token cannot both succeed, and a node
restart does not make a used token usable again.
"""

from __future__ import annotations

from vmmesh.errors import TokenError
from vmmesh.host.store import Store


class InviteBook:
    def __init__(self, store: Store) -> None:
        self._store = store

    def add(self, secret_hash: str, now: float, expires: float) -> None:
        with self._store.transaction() as conn:
            conn.execute(
                "INSERT INTO invites (secret_hash, created, expires) VALUES (?, ?, ?)",
                (secret_hash, now, expires),
            )

    def consume(self, secret_hash: str, now: float, used_by: str = "") -> None:
        """Mark the invite used, or raise TokenError saying why it cannot be."""
        with self._store.transaction() as conn:
            row = conn.execute(
                "SELECT expires, used_at FROM invites WHERE secret_hash = ?", (secret_hash,)
            ).fetchone()
            if row is None:
                raise TokenError("join token unknown to the inviting host")
            if row["used_at"] is not None:
                raise TokenError("join token already used")
            if now > row["expires"]:
                raise TokenError("join token expired")
            conn.execute(
                "UPDATE invites SET used_at = ?, used_by = ? WHERE secret_hash = ?",
                (now, used_by, secret_hash),
            )

    def prune(self, now: float, keep_seconds: float = 7 * 86400) -> None:
        """Forget invites that expired over ``keep_seconds`` ago, used or not.

        Called each time an invite is issued, the only place the table grows.
        A token kept a week past its expiry is still refused as "expired"; one
        pruned is refused as "unknown".
        """
        with self._store.transaction() as conn:
            conn.execute("DELETE FROM invites WHERE expires < ?", (now - keep_seconds,))
