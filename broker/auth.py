"""The broker's side of CURVE: its key pair, and one allowlist of public keys per socket.

libzmq asks a ZAP handler whether each peer's key may use a socket; pyzmq's
ThreadAuthenticator answers from a thread of its own, so that the broker's loop never
waits on a handshake, and this class tells it which keys each socket takes. The two
ROUTERs have ZAP domains of their own, "workers" and "clients", each with its
allowlist: a worker's key cannot act as a client, nor a client's register as a worker.

An allowlist is a directory of public key files (*.key). The broker's loop calls
reload() once a second; a file added, removed or changed there is in force for the next
handshake, with no restart. A connection made before stays: CURVE checks a key when a
connection opens, not later.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass

import zmq
from zmq.auth.thread import ThreadAuthenticator

from zroute.curve import CurveError, load_key_pair, load_public_key, readable_by_others
from zroute.settings import CLIENTS, WORKERS, BrokerSettings

log = logging.getLogger("zroute.broker")

ALLOWLIST_SETTINGS = {WORKERS: "Broker.curve_workers_dir", CLIENTS: "Broker.curve_clients_dir"}
MAX_UNCOUNTED_REFUSALS = 10_000  # refusals the loop has yet to take; past that the oldest go


@dataclass(frozen=True)
class Refusal:
    """A peer whose key an allowlist does not hold: the socket's role (WORKERS or
    CLIENTS), the peer's IP address as ZAP gives it, and its public key (z85)."""

    role: str
    address: str
    key: str


class Allowlist:
    """The public keys that one socket accepts: those of the *.key files in a directory,
    as they were at the last reload()."""

    def __init__(self, role: str, directory: str) -> None:
        self.role = role
        self.directory = directory
        self.keys: frozenset[bytes] = frozenset()  # replaced whole: the ZAP thread reads it
        self._seen: object = ()  # what the directory looked like when last read

    def reload(self) -> bool:
        """Read the directory again if a key file was added, removed or changed since the
        last time; whether it was read."""
        seen = self._look()
        if seen == self._seen:
            return False
        self._seen = seen
        if seen is None:
            log.warning("%s %s cannot be read: no %s is accepted until it can",
                        ALLOWLIST_SETTINGS[self.role], self.directory, self.role)
        keys = set()
        for name, *_ in seen or ():
            try:
                keys.add(load_public_key(os.path.join(self.directory, name),
                                         ALLOWLIST_SETTINGS[self.role]))
            except CurveError as e:
                log.warning("%s; that key is not accepted", e)
        self.keys = frozenset(keys)
        log.info("accepting %d %s key(s) from %s", len(keys), self.role.removesuffix("s"),
                 self.directory)
        return True

    def _look(self) -> list[tuple[str, int, int, int]] | None:
        """The key files' names, times, sizes and inodes, so that a change in any is a
        change; None if the directory cannot be read."""
        try:
            with os.scandir(self.directory) as entries:
                files = [(entry.name, entry.stat()) for entry in entries
                         if entry.name.endswith(".key")]
        except OSError:
            return None
        return sorted((name, st.st_mtime_ns, st.st_size, st.st_ino) for name, st in files)


class BrokerAuth(ThreadAuthenticator):
    """pyzmq's ZAP handler, with the broker's key pair and its two allowlists. It must be
    started before the sockets that it secures bind: libzmq lets any key in on a socket
    whose ZAP handler is not there."""

    def __init__(self, context: zmq.Context, settings: BrokerSettings) -> None:
        super().__init__(context, log=logging.getLogger("zroute.broker.zap"))
        self.public, self.secret = load_key_pair(settings.curve_secret_key,
                                                 "Broker.curve_secret_key")
        if readable_by_others(settings.curve_secret_key):
            log.warning("Broker.curve_secret_key %s can be read by other users: "
                        "chmod 600 it", settings.curve_secret_key)
        self.allowlists = {role: Allowlist(role, settings.allowlist(role))
                           for role in (WORKERS, CLIENTS)}
        for role, allowlist in self.allowlists.items():
            if not os.path.isdir(allowlist.directory):
                raise CurveError(f"{ALLOWLIST_SETTINGS[role]}: {allowlist.directory!r} is not "
                                   "a directory: `zroute keys init` makes it")
            allowlist.reload()
            self.configure_curve_callback(role, self)
        # Filled by the ZAP thread, emptied by the broker's loop.
        self.refusals: deque[Refusal] = deque(maxlen=MAX_UNCOUNTED_REFUSALS)
        self._address = ""  # of the peer whose ZAP request is being answered

    def secure(self, sock: zmq.Socket, role: str) -> None:
        """Make `sock` a CURVE server whose peers must be in the allowlist of `role`;
        before it binds."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        sock.zap_domain = role.encode()

    def reload(self) -> None:
        for allowlist in self.allowlists.values():
            allowlist.reload()

    def take_refusals(self) -> list[Refusal]:
        """The refusals since the last call, oldest first."""
        taken = []
        while self.refusals:
            taken.append(self.refusals.popleft())
        return taken

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # pyzmq gives callback() the domain and the key; the peer's address, which a
        # refusal is logged with, is the ZAP request's fourth frame (RFC 27).
        self._address = msg[3].decode(errors="replace") if len(msg) > 3 else ""
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's question, in the ZAP thread: may the peer with this public key (z85)
        use the socket of `domain`?"""
        if key in self.allowlists[domain].keys:
            return True
        self.refusals.append(Refusal(domain, self._address, key.decode(errors="replace")))
        return False
