"""A Redis Cluster of a test's own: three primaries (no replicas) of the Debian ``redis-server``
on free loopback ports, without persistence.

Each node keeps its ``nodes.conf`` (the cluster's own bookkeeping) in the temp directory but no
data: :meth:`LocalCluster.restart_empty` is a primary that crashed and came back with nothing,
still owning its slots. Used by the ``redis_cluster`` fixture of ``tests/conftest.py``.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

__all__ = ["ClusterNode", "LocalCluster", "cluster_binaries_missing", "free_cluster_port"]

BUS_OFFSET = 10_000  # a node's cluster bus listens on its port + 10000


def cluster_binaries_missing() -> str | None:
    """Why a cluster cannot be started here (None when it can)."""
    missing = [name for name in ("redis-server", "redis-cli") if shutil.which(name) is None]
    return f"{' and '.join(missing)} not on PATH" if missing else None


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port(taken: set[int]) -> int:
    """A port P on 127.0.0.1 that, like its bus port P + 10000, was free a moment ago."""
    for _ in range(1_000):
        port = random.randint(20_000, 50_000)
        if {port, port + BUS_OFFSET} & taken:
            continue
        if _bindable(port) and _bindable(port + BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair (P, P + 10000) on 127.0.0.1")


@dataclass
class ClusterNode:
    """One ``redis-server --cluster-enabled yes`` in ``directory``."""

    directory: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A plain (synchronous) connection to this node only."""
        return redis.Redis("127.0.0.1", self.port, socket_timeout=5, decode_responses=True)

    def start(self, timeout_s: float = 10) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
            "--appendonly",
            "no",
            "--save",
            "",
            "--dir",
            str(self.directory),
        ]
        with (self.directory / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited: {self.log_tail()}")
            try:
                with self.client() as client:
                    if client.ping():
                        return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill the server: without persistence, everything it held is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.kill()
        self.proc.wait(10)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.directory / "redis.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class LocalCluster:
    """Three primaries in ``directory``, slots spread by ``redis-cli --cluster create``."""

    directory: Path
    size: int = 3
    nodes: list[ClusterNode] = field(default_factory=list)

    @property
    def url(self) -> str:
        """``PULLWAKE_REDIS_URL`` of the cluster: its first node (any node would do)."""
        return self.nodes[0].url

    def start(self, timeout_s: float = 30) -> None:
        taken: set[int] = set()
        for index in range(self.size):
            port = free_cluster_port(taken)
            taken |= {port, port + BUS_OFFSET}
            self.nodes.append(ClusterNode(self.directory / f"node{index}", port))
        try:
            for node in self.nodes:
                node.start()
            create = subprocess.run(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{node.port}" for node in self.nodes),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
            if create.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout}")
            self.wait_ok(timeout_s)
        except BaseException:
            self.stop()
            raise

    def wait_ok(self, timeout_s: float = 30) -> None:
        """Until every node says ``cluster_state:ok`` and agrees on all 16384 slots."""
        deadline = time.monotonic() + timeout_s
        while True:
            if all(self._node_ok(node) for node in self.nodes):
                return
            if time.monotonic() > deadline:
                tails = "\n".join(node.log_tail(5) for node in self.nodes)
                raise RuntimeError(f"cluster not ok within {timeout_s}s:\n{tails}")
            time.sleep(0.1)

    def _node_ok(self, node: ClusterNode) -> bool:
        try:
            with node.client() as client:
                info = client.execute_command("CLUSTER", "INFO")
        except (redis.RedisError, OSError):
            return False
        text = info if isinstance(info, str) else str(info)
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        return (
            fields.get("cluster_state") == "ok"
            and fields.get("cluster_slots_ok") == "16384"
            and fields.get("cluster_known_nodes") == str(self.size)
        )

    def node_of(self, key: str) -> ClusterNode:
        """The primary holding ``key``'s slot."""
        with self.nodes[0].client() as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    port = int(primary[1])
                    return next(node for node in self.nodes if node.port == port)
        raise LookupError(f"no node serves the slot of {key!r}")

    def restart_empty(self, node: ClusterNode, down_s: float = 0.0) -> None:
        """Kill ``node`` and start it again with no data (it keeps its nodes.conf, hence its
        slots): a primary that crashed without persistence."""
        node.stop()
        if down_s:
            time.sleep(down_s)
        node.start()
        self.wait_ok()

    def flushall(self) -> None:
        """Empty every primary (a whole cluster restarted without persistence)."""
        for node in self.nodes:
            with node.client() as client:
                client.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
