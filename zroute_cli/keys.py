"""`zroute keys`: CURVE key pairs for the broker, its workers and its clients.

They are pyzmq's certificate files (zmq.auth.create_certificates), in the layout the
Broker section expects:

    keys/                    0700
      broker.key_secret      0600  the broker's key pair: Broker.curve_secret_key
      broker.key                   its public key, for every peer: Broker.curve_public_key
      workers/               0700  the public keys the backend accepts (Broker.curve_workers_dir)
      clients/               0700  those the frontend accepts (Broker.curve_clients_dir)
      NAME.key_secret        0600  a worker's or a client's key pair, for its host only

A secret key is written in a private scratch directory and moved into place with its
mode set, so that it is never readable by others, not even for a moment.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from zmq.auth import create_certificates

from zroute.settings import CLIENTS, WORKERS
from zroute_cli.config import ConfigError

DEFAULT_DIR = "keys"
BROKER = "broker"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PRIVATE_DIR = 0o700
SECRET_FILE = 0o600
PUBLIC_FILE = 0o644


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Create CURVE key pairs: the broker's, and one per worker or client "
                          "(gateway, `zroute stats`, Python client). docs/DEPLOY.md says "
                          "where each file goes.")
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    init = kinds.add_parser("init", help="the broker's key pair, and empty allowlists",
                            description=f"Create DIR/{BROKER}.key_secret (the broker's key "
                                        f"pair), DIR/{BROKER}.key (its public key, for every "
                                        f"peer), and the allowlists DIR/{WORKERS}/ and "
                                        f"DIR/{CLIENTS}/.")
    _common(init, run_init)
    for role, kind in ((WORKERS, "worker"), (CLIENTS, "client")):
        peer = kinds.add_parser(
            kind, help=f"a {kind}'s key pair, its public key in DIR/{role}/",
            description=f"Create DIR/NAME.key_secret (the {kind}'s key pair, for its host) "
                        f"and DIR/{role}/NAME.key (its public key: the broker accepts it "
                        "within a second, without a restart; remove the file to revoke it).")
        peer.add_argument("name", metavar="NAME", help="the key's name: letters, digits, "
                          "'.', '_' and '-', e.g. worker-1 or gateway")
        if role == WORKERS:
            peer.add_argument("--calls", action="store_true",
                              help=f"for the worker of a service with dependencies, which "
                                   f"calls them as a client: its public key in "
                                   f"DIR/{CLIENTS}/ too")
        _common(peer, run_peer)
        peer.set_defaults(role=role)
    parser.set_defaults(prog=parser.prog, command_parser=parser)


def _common(parser: argparse.ArgumentParser, run: Callable[..., int]) -> None:
    parser.add_argument("--dir", default=DEFAULT_DIR, type=Path,
                        help=f"the keys' directory (default: {DEFAULT_DIR})")
    parser.add_argument("--force", action="store_true",
                        help="replace a key pair that exists (the old key stops working "
                             "wherever it was accepted)")
    # What run_command needs of every command; `zroute keys` reads no configuration.
    parser.set_defaults(run=run, prog=parser.prog, command_parser=parser, process_name="keys",
                        log_name=None, log_level="warning", log_format="text", supervised=False)


def run_init(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_overrides(args, overrides)
    directory: Path = args.dir
    for path in (directory, directory / WORKERS, directory / CLIENTS):
        path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        path.chmod(PRIVATE_DIR)  # an existing directory too: it holds secrets
    secret, public = _create(BROKER, directory, directory, args.force)
    print(f"created {secret} (the broker's key pair: keep it on the broker's host)\n"
          f"created {public} (its public key: every worker and client needs it)\n"
          f"allowlists: {directory / WORKERS}/ and {directory / CLIENTS}/\n"
          f"broker: --Broker.curve_secret_key={secret}")
    return 0


def run_peer(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_overrides(args, overrides)
    name, role, directory = args.name, args.role, args.dir
    if not NAME.fullmatch(name) or name == BROKER:
        raise ConfigError(f"{name!r} is not a name for a key: use letters, digits, '.', '_' "
                          f"and '-', at most 64, and not {BROKER!r} (e.g. worker-1)")
    allowlist = directory / role
    if not allowlist.is_dir():
        raise ConfigError(f"{allowlist} is not a directory: run `zroute keys init --dir "
                          f"{directory}` first")
    as_client = directory / CLIENTS / f"{name}.key" if role == WORKERS and args.calls else None
    if as_client is not None and as_client.exists() and not args.force:
        raise ConfigError(f"{as_client} exists: keep it, or give --force to replace it")
    secret, public = _create(name, directory, allowlist, args.force)
    setting = "Backend.curve_key" if role == WORKERS else "Frontend.curve_key"
    print(f"created {secret} (the {role.removesuffix('s')}'s key pair: copy it to its host, "
          "and nowhere else)\n"
          f"created {public} (its public key: the broker accepts it within a second)")
    if as_client is not None:
        shutil.copyfile(public, as_client)
        as_client.chmod(PUBLIC_FILE)
        print(f"created {as_client} (the same key, as a client: its service may call others)")
    print(f"{role.removesuffix('s')}: --{setting}={secret} "
          f"--Broker.curve_public_key={directory / BROKER}.key")
    return 0


def _no_overrides(args: argparse.Namespace, overrides: list[str]) -> None:
    if overrides:
        args.command_parser.error(f"unrecognized argument '--{overrides[0]}': {args.prog} "
                                  "reads no configuration")


def _create(name: str, secret_dir: Path, public_dir: Path, force: bool) -> tuple[Path, Path]:
    """NAME.key_secret in `secret_dir` and NAME.key in `public_dir`; the paths."""
    secret = secret_dir / f"{name}.key_secret"
    public = public_dir / f"{name}.key"
    for path in (secret, public):
        if path.exists() and not force:
            raise ConfigError(f"{path} exists: keep it, or give --force to replace the key "
                              "pair (the old key then stops working)")
    with tempfile.TemporaryDirectory(dir=secret_dir) as scratch:  # 0700
        made_public, made_secret = create_certificates(scratch, name)
        os.chmod(made_secret, SECRET_FILE)
        os.chmod(made_public, PUBLIC_FILE)
        os.replace(made_secret, secret)
        os.replace(made_public, public)
    return secret, public

