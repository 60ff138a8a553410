"""Several nodes on hosts whose name resolves to 127.0.0.1: the start-up check that says
what to set (docs/multi-node.md). scripts/two_hosts.sh runs the real thing (root only)."""

from __future__ import annotations

import pytest

from megabatch import distributed
from megabatch.distributed import launch_environment, loopback_warning

TWO_NODES = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_PORT": "29500"}


def warning(env: dict[str, str], backend: str = "gloo", hostname: str = "localhost") -> str | None:
    info, extra = launch_environment(env)
    return loopback_warning(info, {**env, **extra}, backend, hostname=hostname)


def test_a_loopback_master_address_across_nodes_says_what_to_set():
    message = warning({**TWO_NODES, "MASTER_ADDR": "localhost"})
    assert message.startswith("2 processes on several nodes: MASTER_ADDR=localhost is a loopback address")
    assert "--local-addr=<its own address>" in message and "--rdzv-conf=is_host=1" in message
    assert "export GLOO_SOCKET_IFNAME=<the network interface" in message and "docs/multi-node.md" in message
    assert "\n" not in message


def test_a_host_name_on_loopback_needs_the_gloo_interface():
    message = warning({**TWO_NODES, "MASTER_ADDR": "10.77.0.1"})
    assert "MASTER_ADDR" not in message and "this host's name localhost resolves to a loopback" in message
    assert "GLOO_SOCKET_IFNAME" in message


def test_the_first_node_naming_itself_is_left_to_the_other_nodes(monkeypatch):
    # On node0, MASTER_ADDR=node0 may resolve to 127.0.1.1 (Debian's /etc/hosts) and
    # still be right for the other nodes; node1 resolving it to loopback is wrong.
    real = distributed.socket.getaddrinfo
    monkeypatch.setattr(distributed.socket, "getaddrinfo",
                        lambda host, *a: real("127.0.1.1" if host.startswith("node") else host, *a))
    env = {**TWO_NODES, "MASTER_ADDR": "node0.cluster", "GLOO_SOCKET_IFNAME": "eth0"}
    assert warning(env, hostname="node0") is None
    assert "MASTER_ADDR=node0.cluster is a loopback" in warning(env, hostname="node1")


@pytest.mark.parametrize("env, backend, hostname", [
    ({**TWO_NODES, "MASTER_ADDR": "10.77.0.1", "GLOO_SOCKET_IFNAME": "veth0"}, "gloo", "localhost"),
    ({**TWO_NODES, "MASTER_ADDR": "10.77.0.1"}, "gloo", "10.77.0.2"),  # the name resolves to the network
    ({**TWO_NODES, "MASTER_ADDR": "10.77.0.1"}, "nccl", "localhost"),  # NCCL skips lo by itself
    ({**TWO_NODES, "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "gloo", "localhost"),  # one node
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "gloo", "localhost"),  # by hand: unknown
    ({}, "gloo", "localhost"),  # one process
], ids=["interface-set", "routable-host-name", "nccl", "single-node", "node-count-unknown", "alone"])
def test_no_warning_where_nothing_goes_over_loopback(env, backend, hostname):
    assert warning(env, backend, hostname) is None


@pytest.mark.parametrize("env", [
    {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
     "MASTER_ADDR": "127.0.0.1"},
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_NNODES": "2", "MASTER_ADDR": "127.0.0.1", "SLURM_STEP_ID": "0"},
], ids=["mpirun", "srun"])
def test_other_launchers_spanning_nodes_are_checked_too(env):
    message = warning(env, "nccl")
    assert message.startswith("4 processes on several nodes: MASTER_ADDR=127.0.0.1 is a loopback address")
    assert "export MASTER_ADDR=<the first node's address>" in message


def test_setup_prints_the_warning_once_per_node(monkeypatch, capsys):
    for name, value in {**TWO_NODES, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}.items():
        monkeypatch.setenv(name, value)
    started = []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: started.append(k["world_size"]))
    info = distributed.setup("cpu")
    assert started == [2] and info.world_size == 2
    err = capsys.readouterr().err
    assert err.startswith("megabatch: warning: 2 processes on several nodes: MASTER_ADDR=127.0.0.1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    distributed.setup("cpu")
    assert capsys.readouterr().err == ""
