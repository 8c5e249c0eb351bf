"""Hosts made of Linux network namespaces, for tests that run zroute across network hops.

A Network of N hosts is N network namespaces, each with loopback and one interface, eth0,
with its own address in a private /24 chosen for the run. Each eth0 is one end of a veth
pair whose other end (h1, h2, ...) is a port of a bridge in one more namespace, the
switch. Nothing is added to the machine's own namespace: the addresses exist only inside
the namespaces, and deleting a namespace deletes its ends of the links.

Every namespace is named zroute-PID-..., PID the test run's, so that the namespaces of a
run that was killed are recognised, and removed, by the next run (remove_stale).

A link is cut and restored by setting its port on the switch down and up. It is shaped
in user space, not with the kernel's netem qdisc, which many kernels (small VMs' among
them) are built without: the port leaves the bridge, and a process in the switch
(`python -m tests.hosts link ...`) forwards every frame between it and a veth pair back
into the bridge, after the delay, losing the given fraction. A capture is a raw AF_PACKET
socket on the port, in a process in the switch (`python -m tests.hosts capture ...`):
nothing to install.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from tests.support import REPO_ROOT, ZROUTE, Proc, child_env, wait_until

PREFIX = "zroute-"
STALE_NAME = re.compile(r"zroute-(\d+)-\w+")
FIRST_PORT = 20000
STOP_TIMEOUT_S = 10.0  # SIGTERM, then SIGKILL after this long
# AF_PACKET, for the processes in the switch
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15  # frames carry their offload state (GSO, checksum) with them
FRAME_BYTES = 1 << 17  # an offloaded frame (up to 64 KiB) and its header


# --- the machine ---------------------------------------------------------------------


def unavailable() -> str | None:
    """Why this machine cannot make hosts of network namespaces; None if it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux's"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    added = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if added.returncode != 0:
        return f"ip netns add failed: {added.stderr.strip()}"
    delete_namespace(probe)
    return None


def ip(*args: str) -> None:
    """Run `ip ARGS`; raise with its message if it fails."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def namespaces() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


def delete_namespace(name: str) -> None:
    """Kill what still runs in a namespace, then delete it: a namespace lives on,
    nameless, while a process is in it."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    for pid in map(int, pids.split()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def remove_stale() -> list[str]:
    """Delete the namespaces of test runs that are no longer running; return their names."""
    stale = []
    for name in namespaces():
        match = STALE_NAME.fullmatch(name)
        if match and not pid_alive(int(match[1])):
            delete_namespace(name)
            stale.append(name)
    return stale


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_all(procs: list[Proc]) -> dict[str, int]:
    """Stop processes: SIGTERM to all at once, and Proc.stop() (SIGTERM again, then
    SIGKILL) for any still running after STOP_TIMEOUT_S; their exit codes by name.
    (One SIGTERM each: a second may find a process whose handler is gone already.)"""
    for proc in procs:
        if proc.alive:
            proc.signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for proc in procs:
        try:
            proc.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    return {proc.name: proc.stop(STOP_TIMEOUT_S) for proc in procs}


# --- the network ---------------------------------------------------------------------


class Namespace:
    """A network namespace, and the processes run in it."""

    def __init__(self, network: Network, name: str) -> None:
        self.network = network
        self.name = name

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def ip(self, *args: str) -> None:
        ip("-n", self.name, *args)

    def run(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run a command here to its end; its output is captured as text."""
        return subprocess.run(self.command(*args), capture_output=True, text=True,
                              timeout=timeout, env=child_env(), cwd=REPO_ROOT)

    def start(self, name: str, *args: str) -> Proc:
        """Start a command here; its output goes to a log file (Proc.output())."""
        return self.network.start(name, self.command(*args))

    def python(self, name: str, *args: str) -> Proc:
        """Start the project's Python here (tests' modules import: `-m tests.NAME`)."""
        return self.start(name, sys.executable, *args)

    def zroute(self, name: str, *args: str) -> Proc:
        return self.start(name, ZROUTE, *args)


class Host(Namespace):
    """A host: one address, and one link to the switch."""

    def __init__(self, network: Network, index: int, address: str) -> None:
        super().__init__(network, f"{network.name}-h{index}")
        self.index = index
        self.address = address
        self.link = Link(network, f"h{index}")


class Link:
    """A host's link to the switch, seen from its port there."""

    def __init__(self, network: Network, port: str) -> None:
        self.network = network
        self.port = port
        self.bridge_end = f"{port}b"  # with shaping: the veth pair from the bridge...
        self.shaper_end = f"{port}s"  # ...to the shaping process
        self.shaper: Proc | None = None

    def cut(self) -> None:
        """Pull the cable: nothing crosses the link until restore()."""
        self.network.switch.ip("link", "set", self.port, "down")

    def restore(self) -> None:
        self.network.switch.ip("link", "set", self.port, "up")

    def shape(self, delay: float = 0.0, loss: float = 0.0) -> None:
        """Delay every frame crossing the link by `delay` seconds, each way, and lose a
        fraction `loss` of them; in place of any shaping before."""
        self.unshape()
        switch = self.network.switch
        switch.ip("link", "add", self.shaper_end, "type", "veth", "peer", "name", self.bridge_end)
        switch.ip("link", "set", self.bridge_end, "master", "br0", "up")
        switch.ip("link", "set", self.shaper_end, "up")
        self.shaper = switch.python(f"link-{self.port}", "-m", "tests.hosts", "link", self.port,
                                    self.shaper_end, str(delay), str(loss))
        wait_until(lambda: "forwarding" in self.shaper.output() or not self.shaper.alive, 10,
                   f"the shaping of {self.port} to start")
        assert self.shaper.alive, self.shaper.output()
        # Only now does the port leave the bridge, so that no frame is lost meanwhile (a few
        # may cross twice, which TCP shrugs off).
        switch.ip("link", "set", self.port, "nomaster")

    def unshape(self) -> str:
        """Back to the plain link; what the shaping process said it did, if it ran."""
        if self.shaper is None:
            return ""
        switch = self.network.switch
        switch.ip("link", "set", self.port, "master", "br0")
        exit_code = self.shaper.stop(STOP_TIMEOUT_S)
        output, self.shaper = self.shaper.output(), None
        switch.ip("link", "delete", self.shaper_end)  # and its peer, bridge_end
        assert exit_code == 0 and "Traceback" not in output, output
        return output.splitlines()[-1]

    def capture(self, max_seconds: float = 30.0) -> Capture:
        """Start capturing every frame that crosses the link, until Capture.stop()."""
        path = self.network.log_dir / f"capture-{self.port}-{next(self.network.counter)}.bin"
        proc = self.network.switch.python(f"capture-{self.port}", "-m", "tests.hosts", "capture",
                                          self.port, str(max_seconds), str(path))
        wait_until(lambda: "capturing" in proc.output() or not proc.alive, 10,
                   f"the capture on {self.port} to start")
        return Capture(proc, path)

    def reset(self) -> None:
        """Unshaped and up, as the network made it."""
        self.unshape()
        self.restore()


class Capture:
    """The frames a process in the switch reads from a link, raw, one after another."""

    def __init__(self, proc: Proc, path: Path) -> None:
        self.proc = proc
        self.path = path

    def stop(self) -> bytes:
        """End the capture (it reads what it has been given first); the frames' bytes."""
        exit_code = self.proc.stop(STOP_TIMEOUT_S)
        assert exit_code == 0 and "Traceback" not in self.proc.output(), self.proc.output()
        return self.path.read_bytes()


class Network:
    """`size` hosts, h1 to hN, on one switch. Use it as a context manager, or call
    create() and then close(), which removes everything even after a failure."""

    def __init__(self, size: int, log_dir: Path) -> None:
        pid = os.getpid()
        self.name = f"{PREFIX}{pid}"
        self.log_dir = log_dir
        # 10.x.y.0/24 from the pid: another run's is another subnet, in other namespaces.
        subnet = f"10.{(pid >> 8) & 0xFF}.{pid & 0xFF}"
        self.switch = Namespace(self, f"{self.name}-switch")
        self.hosts = [Host(self, i, f"{subnet}.{i}") for i in range(1, size + 1)]
        self.procs: list[Proc] = []
        self.counter = itertools.count(1)
        self._ports = itertools.count(FIRST_PORT)
        self._created: list[str] = []

    def __enter__(self) -> Network:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def create(self) -> None:
        self._add_namespace(self.switch.name)
        self.switch.ip("link", "set", "lo", "up")
        self.switch.ip("link", "add", "br0", "type", "bridge")
        self.switch.ip("link", "set", "br0", "up")
        for host in self.hosts:
            self._add_namespace(host.name)
            self.switch.ip("link", "add", host.link.port, "type", "veth",
                           "peer", "name", "eth0", "netns", host.name)
            self.switch.ip("link", "set", host.link.port, "master", "br0", "up")
            host.ip("addr", "add", f"{host.address}/24", "dev", "eth0")
            host.ip("link", "set", "eth0", "up")
            host.ip("link", "set", "lo", "up")

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self._created.append(name)

    def port(self) -> int:
        """A TCP port no process on this network has had: the namespaces are new, and
        only its processes listen in them."""
        return next(self._ports)

    def start(self, name: str, command: list[str]) -> Proc:
        """A process whose log file is named after `name`, and numbered: a name may recur."""
        proc = Proc(f"{next(self.counter):03d}-{name}", command, self.log_dir, REPO_ROOT)
        self.procs.append(proc)
        return proc

    def reset(self) -> None:
        """Every link up and unshaped, for the next test."""
        for host in self.hosts:
            host.link.reset()

    def close(self) -> None:
        """Stop every process, then delete every namespace (and so every link)."""
        try:
            stop_all(self.procs)
        finally:
            for name in reversed(self._created):
                delete_namespace(name)
            self._created.clear()


# --- the processes in the switch -------------------------------------------------------


def packet_socket(interface: str, offloads: bool = False) -> socket.socket:
    """A raw socket on `interface` that reads every frame crossing it; with `offloads`,
    each frame comes with its offload header, and is sent back with it."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    if offloads:
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.bind((interface, 0))
    return sock


def receive(sock: socket.socket) -> bytes | None:
    """The next frame that came in (not one this socket's interface sent); None when
    there is none for now, or the link is down."""
    while True:
        try:
            frame, address = sock.recvfrom(FRAME_BYTES)
        except (BlockingIOError, TimeoutError):
            return None
        except OSError as e:
            if e.errno == errno.ENETDOWN:  # the link was cut
                return None
            raise
        if address[2] != socket.PACKET_OUTGOING:
            return frame


def stop_on_sigterm() -> None:
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, stop)


def capture(interface: str, max_seconds: float, path: str) -> None:
    """Write every frame crossing `interface` to `path` until SIGTERM or `max_seconds`;
    on SIGTERM, what has been received already is written first."""
    sock = packet_socket(interface)
    deadline = time.monotonic() + max_seconds
    with open(path, "wb") as out:
        stop_on_sigterm()
        print("capturing", flush=True)
        try:
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                out.write(receive(sock) or b"")
        except SystemExit:
            sock.setblocking(False)
            while (frame := receive(sock)) is not None:
                out.write(frame)


def forward(port: str, bridge_side: str, delay: float, loss: float) -> None:
    """Forward frames both ways between a host's port and the bridge, each `delay` seconds
    after it came, losing each with probability `loss`, until SIGTERM."""
    ends = [packet_socket(port, offloads=True), packet_socket(bridge_side, offloads=True)]
    other = {ends[0]: ends[1], ends[1]: ends[0]}
    waiting: dict[socket.socket, deque[tuple[float, bytes]]] = {end: deque() for end in ends}
    counts = {"forwarded": 0, "lost": 0}
    for end in ends:
        end.setblocking(False)
    stop_on_sigterm()
    print("forwarding", flush=True)
    try:
        while True:
            due = [queue[0][0] for queue in waiting.values() if queue]
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            readable, _, _ = select.select(ends, [], [], timeout)
            for end in readable:
                while (frame := receive(end)) is not None:
                    if random.random() < loss:
                        counts["lost"] += 1
                    else:
                        waiting[other[end]].append((time.monotonic() + delay, frame))
            now = time.monotonic()
            for end, queue in waiting.items():
                while queue and queue[0][0] <= now:
                    send(end, queue.popleft()[1])
                    counts["forwarded"] += 1
    except SystemExit:
        print(f"forwarded {counts['forwarded']} frames, lost {counts['lost']}", flush=True)


def send(sock: socket.socket, frame: bytes) -> None:
    try:
        sock.send(frame)
    except OSError as e:
        if e.errno not in (errno.ENETDOWN, errno.ENXIO):  # the link was cut: the frame is lost
            raise


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.hosts")
    commands = parser.add_subparsers(dest="command", required=True)
    capturing = commands.add_parser("capture", help="write a link's frames to a file")
    capturing.add_argument("interface")
    capturing.add_argument("max_seconds", type=float)
    capturing.add_argument("path")
    linking = commands.add_parser("link", help="forward frames with a delay and a loss")
    linking.add_argument("port")
    linking.add_argument("bridge_side")
    linking.add_argument("delay", type=float)
    linking.add_argument("loss", type=float)
    args = parser.parse_args(argv)
    if args.command == "capture":
        capture(args.interface, args.max_seconds, args.path)
    else:
        forward(args.port, args.bridge_side, args.delay, args.loss)


if __name__ == "__main__":
    main(sys.argv[1:])
