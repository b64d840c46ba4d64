"""Training on several nodes: what each node is told, checked before torch's elastic agent starts.

Every node runs the same `cosa train ... --nnodes N --node-rank R --rdzv-endpoint HOST:PORT`;
torch's elastic agent (the launcher behind torchrun, c10d rendezvous backend) on each node gathers
the nodes and starts that node's ranks. Node rank 0 hosts the rendezvous store on PORT, so HOST
must be its address. The global ranks are torch's to assign (its c10d rendezvous orders the nodes
itself), so rank 0, which writes the run folder, may run on any node: `--out` must be one folder
that every node shares.
"""

from __future__ import annotations

import errno
import socket
import time
from dataclasses import dataclass

from cosa.errors import ConfigError

DEFAULT_PORT = 29400  # torchrun's port for the c10d rendezvous when HOST has none
DEFAULT_TIMEOUT_S = 600  # torch's c10d join_timeout: the nodes of a cluster job start minutes apart
_PROBE_INTERVAL_S = 0.5


@dataclass(frozen=True)
class NodeGroup:
    """This node's place in a multi-node run.

    Attributes:
        nnodes: nodes in the run, all started with the same options but `node_rank`.
        node_rank: 0 ... nnodes - 1; node 0 hosts the rendezvous store at `host`:`port`.
        host, port: node rank 0's address and the port of its rendezvous store.
        timeout_s: how long a node waits for the other nodes to join (and for node 0 to answer).
    """

    nnodes: int
    node_rank: int
    host: str
    port: int
    timeout_s: int = DEFAULT_TIMEOUT_S

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6
        return f"{host}:{self.port}"

    @property
    def hosts_store(self) -> bool:
        return self.node_rank == 0


def node_group(
    nnodes: int, node_rank: int, endpoint: str | None, timeout_s: int = DEFAULT_TIMEOUT_S
) -> NodeGroup | None:
    """The checked multi-node options, or None for a run on this node alone (no endpoint).

    One node with an endpoint is a `NodeGroup` too, so a job script scaled down to one node runs
    unchanged.

    Raises:
        ConfigError: options that do not fit together or a malformed endpoint, naming the fix.
    """
    if nnodes < 1:
        raise ConfigError(f"--nnodes {nnodes}: pass the number of nodes, 1 or more")
    if not 0 <= node_rank < nnodes:
        raise ConfigError(
            f"--node-rank {node_rank} with --nnodes {nnodes}: node ranks run from 0 to "
            f"{nnodes - 1}, one per node"
        )
    if endpoint is None:
        if nnodes > 1:
            raise ConfigError(
                f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, the address of node rank 0 "
                f"(e.g. node0:{DEFAULT_PORT}), the same on every node"
            )
        return None
    if timeout_s <= 0:
        raise ConfigError(f"--rdzv-timeout {timeout_s}: pass a number of seconds above 0")
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    try:
        host, port = parse_rendezvous_endpoint(endpoint, DEFAULT_PORT)
    except ValueError as exc:
        raise ConfigError(
            f"--rdzv-endpoint {endpoint!r}: {exc} Pass HOST:PORT of node rank 0 "
            f"(e.g. node0:{DEFAULT_PORT})"
        ) from None
    if port == 0:
        raise ConfigError(
            f"--rdzv-endpoint {endpoint!r}: port 0 cannot be reached by the other nodes; pass a "
            f"fixed port (e.g. {DEFAULT_PORT})"
        )
    return NodeGroup(nnodes, node_rank, host, port, timeout_s)


def check_endpoint(group: NodeGroup) -> None:
    """Fail early, with a clear line, where torch would retry for minutes and then print C++ logs.

    Node rank 0 checks that it can open the store's port; the others wait (up to the rendezvous
    timeout: node 0 may start later) until HOST:PORT accepts a connection.

    Raises:
        ConfigError: the port is taken on node 0, or node 0's endpoint did not answer in time.
    """
    if group.hosts_store:
        _check_port_free(group)
    else:
        _wait_until_reachable(group)


def _check_port_free(group: NodeGroup) -> None:
    with socket.socket(socket.AF_INET6 if ":" in group.host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store binds
        try:
            sock.bind(("", group.port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise ConfigError(
                f"--rdzv-endpoint {group.endpoint}: port {group.port} is already in use on this "
                "node (node rank 0 hosts the rendezvous there); stop what holds it or pick another "
                "port on every node"
            ) from None


def _wait_until_reachable(group: NodeGroup) -> None:
    deadline = time.monotonic() + group.timeout_s
    while True:
        try:
            with socket.create_connection((group.host, group.port), timeout=_PROBE_INTERVAL_S):
                return
        except OSError as exc:  # refused, unresolvable (DNS may lag a starting pod), timed out
            reason = exc.strerror or str(exc) or type(exc).__name__
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"--rdzv-endpoint {group.endpoint}: node rank 0 did not answer within "
                f"{group.timeout_s} s ({reason}); start node rank 0 with the same "
                "--rdzv-endpoint, or pass its address and an open port"
            )
        time.sleep(_PROBE_INTERVAL_S)
