"""Private Redis Sentinel and Redis Cluster setups of ``redis-server`` processes.

* :class:`SentinelTopology`: one master, optionally one replica, and 1-3
  ``redis-server --sentinel`` processes monitoring it (quorum 1, fast failure detection).
* :class:`ClusterTopology`: three masters started with ``--cluster-enabled yes`` and joined
  with ``redis-cli --cluster create … --cluster-replicas 0`` (or, without redis-cli, with
  ``CLUSTER ADDSLOTS`` / ``CLUSTER MEET`` from Python).

Every process is a :class:`~tests.support.redis_server.RedisServer` on a free loopback
port (so safe under pytest-xdist), killed at exit if a test forgets to stop it. Waits are
bounded polls. :class:`TopologyUnavailable` means the binary cannot run that topology at
all (tests skip on it); any other failure is an error.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.lifecycle import Managed
from tests.support.net import LOOPBACK, free_port
from tests.support.redis_server import RedisServer, RedisServerError, find_redis_server

READY_TIMEOUT = 15.0
POLL_INTERVAL = 0.05
MASTER_NAME = "authsession-test"
# Lines redis-server prints when it does not know an option or mode at all.
_UNSUPPORTED_MARKERS = ("Bad directive", "FATAL CONFIG FILE ERROR", "unknown option")


class TopologyUnavailable(RuntimeError):
    """This redis-server binary cannot run a Sentinel or Cluster setup."""


def find_redis_cli(server_binary: str | None = None) -> str | None:
    """``redis-cli`` next to the ``redis-server`` binary, else on PATH, else None."""
    server = Path(server_binary or find_redis_server())
    for directory in (server.parent, server.resolve().parent):
        candidate = directory / "redis-cli"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("redis-cli")


def wait_for(condition: Callable[[], bool], what: str, timeout: float = READY_TIMEOUT) -> float:
    """Poll ``condition`` until it holds; the seconds it took. ``TimeoutError`` otherwise."""
    start = time.monotonic()
    last_error: Exception | None = None
    while True:
        try:
            if condition():
                return time.monotonic() - start
        except redis.RedisError as exc:  # not up yet, failing over, …
            last_error = exc
        if time.monotonic() - start >= timeout:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"{what}: not within {timeout}s{detail}")
        time.sleep(POLL_INTERVAL)


def _start(server: RedisServer, role: str) -> None:
    try:
        server.start()
    except RedisServerError as exc:
        if any(marker in str(exc) for marker in _UNSUPPORTED_MARKERS):
            raise TopologyUnavailable(f"{server.binary} cannot run a {role}: {exc}") from exc
        raise


def _client(host: str, port: int, **kwargs: Any) -> redis.Redis:
    return redis.Redis(
        host=host,
        port=port,
        decode_responses=True,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
        retry=Retry(NoBackoff(), 0),
        **kwargs,
    )


# --------------------------------------------------------------------------- sentinel
class SentinelServer(RedisServer):
    """One ``redis-server <conf> --sentinel`` monitoring ``master_name`` at a master."""

    def __init__(
        self,
        master_name: str,
        master: RedisServer,
        *,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        binary: str | None = None,
    ) -> None:
        super().__init__(binary=binary)
        self.master_name = master_name
        self.master = master
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    def _command(self) -> list[str]:
        assert self._dir is not None
        # Sentinel insists on a writable config file (it records what it learns there).
        config = self._dir / "sentinel.conf"
        name = self.master_name
        config.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    f"bind {self.host}",
                    "protected-mode no",
                    "daemonize no",
                    f"dir {self._dir}",
                    f"sentinel monitor {name} {self.master.host} {self.master.port} 1",
                    f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                    f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                    f"sentinel parallel-syncs {name} 1",
                    "",
                ]
            )
        )
        return [self.binary, str(config), "--sentinel"]

    def sentinel_client(self) -> redis.Redis:
        """A sync client on this sentinel (it answers ``SENTINEL …`` commands)."""
        return _client(self.host, self.port)


class SentinelTopology(Managed):
    """A master (plus an optional replica) watched by ``sentinels`` sentinels."""

    def __init__(
        self, *, sentinels: int = 2, replica: bool = False, master_name: str = MASTER_NAME
    ) -> None:
        if not 1 <= sentinels <= 3:
            raise ValueError("1 to 3 sentinels")
        self.master_name = master_name
        self.binary = find_redis_server()
        # A replica's first sync starts at once, not after the default 5 s diskless delay.
        self.master = RedisServer(["--repl-diskless-sync-delay", "0"], binary=self.binary)
        self.replica: RedisServer | None = None
        self._sentinel_count = sentinels
        self._want_replica = replica
        self.sentinels: list[SentinelServer] = []

    @property
    def servers(self) -> list[RedisServer]:
        """Every process of the setup."""
        data = [self.master] + ([self.replica] if self.replica else [])
        return [*data, *self.sentinels]

    @property
    def sentinel_addrs(self) -> list[str]:
        """``host:port`` of every sentinel (the form of ``AUTHSESSION_REDIS_ADDR``)."""
        return [s.addr for s in self.sentinels]

    def start(self) -> Self:
        try:
            _start(self.master, "Sentinel-monitored master")
            if self._want_replica:
                self.replica = RedisServer(
                    ["--replicaof", self.master.host, str(self.master.port)], binary=self.binary
                )
                _start(self.replica, "replica")
                wait_for(self._replica_in_sync, "replica in sync with the master")
            for _ in range(self._sentinel_count):
                sentinel = SentinelServer(self.master_name, self.master, binary=self.binary)
                self.sentinels.append(sentinel)
                _start(sentinel, "sentinel")
            wait_for(self._sentinels_ready, "sentinels know the master (and the replica)")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()

    def master_addr(self) -> tuple[str, int] | None:
        """Where the first live sentinel says the master is."""
        for sentinel in self.sentinels:
            if not sentinel.is_running():
                continue
            with sentinel.sentinel_client() as client:
                try:
                    reply = client.sentinel_get_master_addr_by_name(self.master_name)
                except redis.ConnectionError:
                    continue
            if reply:
                return str(reply[0]), int(reply[1])
        return None

    def master_client(self) -> redis.Redis:
        """A sync client on the current master."""
        addr = self.master_addr()
        if addr is None:
            raise RuntimeError("no sentinel knows the master")
        return _client(*addr)

    def flush(self) -> None:
        with self.master_client() as client:
            client.flushall()

    def failover_after_master_crash(self, timeout: float) -> float:
        """Kill the master, have a sentinel promote the replica; seconds until it is done.

        ``SENTINEL FAILOVER`` starts the failover at once instead of waiting for the
        sentinels to agree that the master is down. ``TimeoutError`` if it takes longer.
        """
        assert self.replica is not None, "a failover needs a replica"
        old = (self.master.host, self.master.port)
        promoted = (self.replica.host, self.replica.port)
        with self.master.client() as client:
            client.wait(1, 2000)  # what the clients wrote is on the replica
        start = time.monotonic()
        self.master.kill()
        with self.sentinels[0].sentinel_client() as client:
            client.execute_command("SENTINEL FAILOVER", self.master_name)

        def switched() -> bool:
            # Done when every sentinel's master entry (what clients read with
            # SENTINEL MASTERS) names the promoted replica and looks healthy; during the
            # failover it still names the old master.
            for sentinel in self.sentinels:
                with sentinel.sentinel_client() as client:
                    state = client.sentinel_master(self.master_name)
                addr = (str(state["ip"]), int(state["port"]))
                if addr == old:
                    return False
                assert addr == promoted, addr
                if not state["is_master"] or state["is_sdown"] or state["is_odown"]:
                    return False
            with _client(*promoted) as client:
                return str(client.info("replication")["role"]) == "master"

        wait_for(switched, "failover to the replica", timeout=timeout)
        return time.monotonic() - start

    def _replica_in_sync(self) -> bool:
        assert self.replica is not None
        with self.replica.client() as client:
            return str(client.info("replication").get("master_link_status")) == "up"

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            with sentinel.sentinel_client() as client:
                master = client.sentinel_get_master_addr_by_name(self.master_name)
                if not master or int(master[1]) != self.master.port:
                    return False
                if self.replica is not None:
                    # Known, connected, and its INFO read (else it cannot be promoted).
                    replicas = client.sentinel_slaves(self.master_name)
                    if not any(
                        int(r["port"]) == self.replica.port
                        and not r["is_sdown"]
                        and not r["is_disconnected"]
                        and r.get("master-link-status") == "ok"
                        for r in replicas
                    ):
                        return False
        return True


# --------------------------------------------------------------------------- cluster
CLUSTER_SLOTS = 16384
CLUSTER_BUS_OFFSET = 10000
_PORT_ATTEMPTS = 5


class ClusterTopology(Managed):
    """Three (or more) cluster masters, no replicas, every slot assigned."""

    def __init__(self, masters: int = 3, *, node_timeout_ms: int = 5000) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.binary = find_redis_server()
        self._count = masters
        self._args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",  # relative to the node's private --dir
            "--cluster-node-timeout",
            str(node_timeout_ms),
        ]
        self.nodes: list[RedisServer] = []
        self.joined_with = ""

    @property
    def addrs(self) -> list[str]:
        """``host:port`` of every node (seeds for ``AUTHSESSION_REDIS_ADDR``)."""
        return [node.addr for node in self.nodes]

    def start(self) -> Self:
        try:
            for _ in range(self._count):
                self.nodes.append(self._start_node())
            cli = find_redis_cli(self.binary)
            if cli is not None:
                self._create_with_cli(cli)
                self.joined_with = "redis-cli"
            else:
                self._create_with_commands()
                self.joined_with = "CLUSTER ADDSLOTS/MEET"
            wait_for(self._cluster_ok, "cluster state ok on every node")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def _start_node(self) -> RedisServer:
        # The cluster bus listens on port + 10000 (below 65536, and free too), so the
        # port is chosen here rather than by RedisServer.
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            node = RedisServer(self._args, port=_port_with_free_bus(), binary=self.binary)
            try:
                _start(node, "cluster node")
                return node
            except RedisServerError:
                node.stop()
                if attempt == _PORT_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def client(self) -> redis.cluster.RedisCluster:
        """A sync cluster client (``decode_responses=True``); the caller closes it."""
        return redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(n.host, n.port) for n in self.nodes],
            decode_responses=True,
            socket_timeout=2.0,
        )

    def flush(self) -> None:
        for node in self.nodes:
            with node.client() as client:
                client.flushall()

    def _create_with_cli(self, cli: str) -> None:
        command = [
            cli,
            "--cluster",
            "create",
            *self.addrs,
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=READY_TIMEOUT, check=False
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            if "cluster support disabled" in output or "unknown command" in output.lower():
                raise TopologyUnavailable(f"redis-cli cannot create a cluster: {output}")
            raise RedisServerError(f"redis-cli --cluster create failed: {output}")

    def _create_with_commands(self) -> None:
        ranges = _slot_ranges(len(self.nodes))
        for node, (first, last) in zip(self.nodes, ranges, strict=True):
            with node.client() as client:
                client.execute_command("CLUSTER ADDSLOTS", *range(first, last + 1))
        with self.nodes[0].client() as client:
            for node in self.nodes[1:]:
                client.execute_command("CLUSTER MEET", node.host, node.port)

    def _cluster_ok(self) -> bool:
        for node in self.nodes:
            with node.client() as client:
                info = client.cluster("INFO")
                if isinstance(info, str):
                    info = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
                if str(info.get("cluster_state")) != "ok":
                    return False
                if int(info.get("cluster_known_nodes", 0)) != len(self.nodes):
                    return False
                if int(info.get("cluster_slots_ok", 0)) != CLUSTER_SLOTS:
                    return False
        return True


def _port_with_free_bus() -> int:
    while True:
        port = free_port()
        if port + CLUSTER_BUS_OFFSET > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port + CLUSTER_BUS_OFFSET))
            except OSError:
                continue
        return port


def _slot_ranges(count: int) -> Sequence[tuple[int, int]]:
    size = CLUSTER_SLOTS // count
    bounds = [i * size for i in range(count)] + [CLUSTER_SLOTS]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(count)]
