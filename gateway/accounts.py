"""Which CURVE public key belongs to which account, and the ZAP handler that enforces it.

Registry layout: a directory with one pyzmq certificate file per account, named by the account
id: `ACCOUNTS_DIR/<account>.key`, as written by `zmq.auth.create_certificates(dir, str(id))`
(only the public key is read; a `<account>.key_secret` beside it is ignored, and so is any file
whose name is not a decimal account id, such as the server's own certificate).

New accounts need no restart: an unknown key at the handshake re-scans the directory (at most
every `rescan_interval_s`; a refused client's DEALER retries by itself, so it gets in on a later
attempt). A key that is removed stops new handshakes after the next re-scan; connections
already open stay open until they close.

The handshake: every connection to the order socket goes through ZAP (pyzmq's
ThreadAuthenticator, a thread of the gateway process). An unknown key is refused there, so the
client never gets a byte through. A known key is accepted with the account id as the ZAP
User-Id, which libzmq attaches to every message of that connection: the gateway reads the
account from there, never from the message.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("perpx.gateway")

ZAP_DOMAIN = "perpx"


class AccountRegistry:
    def __init__(self, accounts_dir, max_accounts: int | None = None,
                 rescan_interval_s: float = 0.2):
        self.dir = Path(accounts_dir)
        self.max_accounts = max_accounts
        self.rescan_interval_s = rescan_interval_s
        self._lock = threading.Lock()
        self._by_key: dict[bytes, int] = {}
        self._last_scan = 0.0
        self.scan()

    def scan(self) -> dict[bytes, int]:
        """Re-read the directory; returns the new {z85 public key: account} map."""
        found: dict[bytes, int] = {}
        seen_twice = set()
        paths = sorted(self.dir.glob("*.key")) if self.dir.is_dir() else []
        for path in paths:
            stem = path.stem
            if not stem.isascii() or not stem.isdigit():
                continue
            account = int(stem)
            if self.max_accounts is not None and not 0 <= account < self.max_accounts:
                log.warning("ignoring %s: account %d is outside 0..%d", path, account,
                            self.max_accounts - 1)
                continue
            try:
                public, _ = zmq.auth.load_certificate(path)
            except Exception as e:  # a half-written or foreign file: skip it, say so
                log.warning("ignoring %s: %s", path, e)
                continue
            if public in found:
                seen_twice.add(public)
            found[public] = account
        for key in seen_twice:   # one key, two accounts: ambiguous, so neither
            log.error("public key %s is registered for more than one account; refused",
                      key.decode())
            del found[key]
        with self._lock:
            self._by_key = found
            self._last_scan = time.monotonic()
        return found

    def account_of(self, z85_key: bytes) -> int | None:
        account = self._by_key.get(z85_key)
        if account is None and time.monotonic() - self._last_scan >= self.rescan_interval_s:
            account = self.scan().get(z85_key)
        return account


class _Credentials:
    def __init__(self, registry: AccountRegistry, admit):
        self.registry = registry
        self.admit = admit

    def callback(self, domain, key):
        account = self.registry.account_of(key)
        return account is not None and self.admit(account)


class AccountAuthenticator(ThreadAuthenticator):
    """ZAP: accept registered CURVE keys only, with the account id as the connection's User-Id.
    `admit(account)` (called in the ZAP thread) may refuse a registered key too: the gateway's
    connection limits."""

    def __init__(self, context: zmq.Context, registry: AccountRegistry, admit=None):
        super().__init__(context)
        self.registry = registry
        self.admit = admit or (lambda account: True)

    def start(self):
        super().start()
        self.configure_curve_callback(ZAP_DOMAIN, _Credentials(self.registry, self.admit))

    def curve_user_id(self, client_public_key: bytes) -> str:
        """pyzmq's hook: the User-Id a CURVE client's messages carry (its account id)."""
        account = self.registry.account_of(z85.encode(client_public_key))
        return str(account)
