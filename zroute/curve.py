"""CURVE keys, as the broker's peers use them: ZeroMQ's authentication and encryption.

Keys live in pyzmq's certificate files (zmq.auth): NAME.key holds a public key, and
NAME.key_secret the key pair, both in z85 text. `zroute keys` makes them. A peer (a worker,
a gateway, a client) connects with its own key pair and the broker's public key, and the
broker accepts it only if its public key is in the allowlist of the socket it connects
to (broker/auth.py).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq
from zmq.auth import load_certificate

if TYPE_CHECKING:
    from zroute.settings import BrokerSettings


class CurveError(Exception):
    """A key file or an allowlist that cannot be used, or a broker that would listen
    beyond loopback without keys; str() is one line that names the setting and says what
    to do."""


def _read(path: str, setting: str) -> tuple[bytes, bytes | None]:
    try:
        return load_certificate(path)
    except OSError:
        raise CurveError(f"{setting}: {path!r} cannot be read: create keys with "
                           "`zroute keys init --dir keys` (docs/DEPLOY.md)") from None
    except ValueError:
        raise CurveError(f"{setting}: {path!r} holds no public key: it is not a key "
                           "file that `zroute keys` made") from None


def load_public_key(path: str, setting: str) -> bytes:
    """The public key (z85) in a certificate file, NAME.key or NAME.key_secret."""
    return _read(path, setting)[0]


def load_key_pair(path: str, setting: str) -> tuple[bytes, bytes]:
    """(public, secret) from a NAME.key_secret file; a public key file is refused."""
    public, secret = _read(path, setting)
    if secret is None:
        raise CurveError(f"{setting}: {path!r} holds a public key only: give the "
                           "NAME.key_secret file that `zroute keys` made beside it")
    return public, secret


def readable_by_others(path: str) -> bool:
    """Whether users other than the owner may read the file (a secret key should not)."""
    return bool(os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))


@dataclass(frozen=True)
class PeerKeys:
    """A peer's key pair and the broker's public key, in z85: what a worker or a client
    connects with. The secret key is left out of repr(), so that no log shows it."""

    public: bytes
    secret: bytes = field(repr=False)
    broker: bytes

    @classmethod
    def load(cls, key_file: str, broker_key_file: str, *, key_setting: str = "key file",
             broker_setting: str = "broker's public key") -> PeerKeys:
        """From a NAME.key_secret file and the broker's broker.key (or any file that holds
        its public key); the settings' names are what errors call them."""
        public, secret = load_key_pair(key_file, key_setting)
        return cls(public, secret, load_public_key(broker_key_file, broker_setting))

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE client of the broker; before it connects."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.broker


def peer_keys(key_file: str, key_setting: str, broker: BrokerSettings) -> PeerKeys | None:
    """The keys a peer of the broker connects with: its pair from `key_file` (the setting
    `key_setting`, e.g. "Backend.curve_key") and the broker's public key from
    Broker.curve_public_key, or else from the broker's own key file, where the peer runs
    beside the broker. None without a key file: the peer connects without CURVE."""
    if not key_file:
        return None
    if broker.curve_public_key:
        broker_file, broker_setting = broker.curve_public_key, "Broker.curve_public_key"
    elif broker.curve_secret_key:
        broker_file, broker_setting = broker.curve_secret_key, "Broker.curve_secret_key"
    else:
        raise CurveError(f"{key_setting} is set, but not the broker's public key: set "
                           "Broker.curve_public_key to the broker.key file that `zroute keys "
                           "init` made")
    return PeerKeys.load(key_file, broker_file, key_setting=key_setting,
                         broker_setting=broker_setting)
