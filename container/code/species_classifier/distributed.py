"""Folds across every GPU of every host, with torch.distributed's own launcher.

K-fold cross-validation is embarrassingly parallel: fold k is trained by worker
(k - 1) % world_size, start to finish, and the finished folds are gathered to the leader
(global rank 0 on host `sorted(hosts)[0]`), which alone writes /opt/ml/model and
/opt/ml/output. The workers are started by torchrun's engine (`elastic_launch`, static
rendezvous on the leader, one worker per GPU or `workers_per_host` on CPU), NCCL on GPUs
and gloo on CPUs; results travel over a gloo group, which carries Python objects between
hosts whatever the devices. A single-host job rendezvous on the loopback address and needs
no name resolution at all: SageMaker's host names may resolve only minutes after the
container starts, and never outside SageMaker.

A fold's result depends only on (seed, fold, data), never on which worker trained it, so
one worker and sixteen give the same per-fold metrics.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from species_classifier.contract.hyperparameters import ConfigError
from species_classifier.gpu import workers_for_host

_log = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 7777  # as SageMaker's PyTorch containers use
HOST_RESOLUTION_TIMEOUT_S = 15 * 60
HOST_WAIT_LOG_EVERY_S = 30
HOST_POLL_S = 5
LOOPBACK_ADDRESS = "127.0.0.1"
LOOPBACK_INTERFACE = "lo"
# NCCL's collectives are the refit's gradient all-reduces, one per step: an hour without
# one means a peer hangs.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)
# The gloo group's waits last as long as a worker's own work: the start-up barrier waits
# for the host's decode, gathering the folds for the worker with the most folds (a whole
# fold more than one with fewer). No fixed wait fits them, so their deadline is the job's:
# SageMaker stops a job at its MaxRuntimeInSeconds, at most 28 days, and the launcher stops
# every worker as soon as one fails.
OBJECT_WAIT_TIMEOUT = timedelta(days=28)


@dataclass(frozen=True)
class Topology:
    """The job's hosts (from resourceconfig.json) and the workers each one runs."""

    hosts: tuple[str, ...]
    current_host: str
    workers_per_host: int
    network_interface: str | None = None

    @property
    def leader(self) -> str:
        return self.hosts[0]

    @property
    def node_rank(self) -> int:
        return self.hosts.index(self.current_host)

    @property
    def world_size(self) -> int:
        return len(self.hosts) * self.workers_per_host


def read_topology(resource_config: Path, workers_per_host: int) -> Topology:
    """Hosts sorted (SageMaker's leader rule); workers: the hyperparameter, else one per GPU."""
    try:
        workers = workers_for_host(workers_per_host, torch.cuda.device_count())
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if not resource_config.is_file():
        return Topology(hosts=("localhost",), current_host="localhost", workers_per_host=workers)
    raw = json.loads(resource_config.read_text())
    return Topology(
        hosts=tuple(sorted(raw["hosts"])),
        current_host=raw["current_host"],
        workers_per_host=workers,
        network_interface=raw.get("network_interface_name"),
    )


def rendezvous_address(topology: Topology) -> str:
    """Where the workers meet: the loopback address on one host, else the leader's name."""
    return LOOPBACK_ADDRESS if len(topology.hosts) == 1 else topology.leader


def wait_for_hosts(
    hosts: tuple[str, ...],
    timeout_s: float = HOST_RESOLUTION_TIMEOUT_S,
    log_every_s: float = HOST_WAIT_LOG_EVERY_S,
    poll_s: float = HOST_POLL_S,
) -> None:
    """SageMaker's host names may resolve only some time after the container starts: wait,
    saying what for at once and every `log_every_s`, so a stuck job never looks idle."""
    started = time.monotonic()
    deadline = started + timeout_s
    next_log = started
    for host in hosts:
        while True:
            try:
                socket.gethostbyname(host)
                break
            except socket.gaierror:
                now = time.monotonic()
                if now > deadline:
                    raise RuntimeError(
                        f"host {host} did not resolve within {timeout_s:.0f} s: the job's hosts "
                        f"{list(hosts)} must reach each other by name"
                    ) from None
                if now >= next_log:
                    _log.info(
                        "distributed: waiting for host %s to resolve (%.0f s so far, giving up "
                        "after %.0f s)",
                        host,
                        now - started,
                        timeout_s,
                    )
                    next_log = now + log_every_s
                time.sleep(poll_s)


@dataclass(frozen=True)
class Workers:
    """This process's place among the job's workers; a single worker needs no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    object_group: object | None = None

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def owns_fold(self, fold: int) -> bool:
        return (fold - 1) % self.world_size == self.rank

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.object_group)

    def gather_to_leader(self, item: object) -> list | None:
        """Every worker's `item`, in rank order, on the leader; None elsewhere."""
        if self.world_size == 1:
            return [item]
        gathered = [None] * self.world_size if self.is_leader else None
        dist.gather_object(item, gathered, dst=0, group=self.object_group)
        return gathered

    def share_from_leader(self, item: object) -> object:
        """The leader's `item`, on every worker."""
        if self.world_size == 1:
            return item
        box = [item if self.is_leader else None]
        dist.broadcast_object_list(box, src=0, group=self.object_group)
        return box[0]

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def join_process_group() -> Workers:
    """Inside a worker started by the launcher: RANK, WORLD_SIZE, MASTER_* are set."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    timeout = COLLECTIVE_TIMEOUT if backend == "nccl" else OBJECT_WAIT_TIMEOUT
    dist.init_process_group(backend=backend, timeout=timeout)
    object_group = (
        dist.new_group(backend="gloo", timeout=OBJECT_WAIT_TIMEOUT)
        if backend != "gloo"
        else dist.group.WORLD
    )
    return Workers(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ["LOCAL_RANK"]),
        object_group=object_group,
    )


def launch(topology: Topology, run_id: str, entrypoint, *args) -> None:
    """Start `entrypoint(*args)` in every worker of this host; raise if any of them fails."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    address = rendezvous_address(topology)
    # One host talks to itself over loopback; several over the interface SageMaker names.
    interface = LOOPBACK_INTERFACE if address == LOOPBACK_ADDRESS else topology.network_interface
    if interface:
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    if address != LOOPBACK_ADDRESS:
        wait_for_hosts(topology.hosts)
    port = int(os.environ.get("MASTER_PORT", DEFAULT_MASTER_PORT))
    _log.info(
        "distributed: host %s is node %d of %s, %d worker(s) per host, rendezvous at %s:%d",
        topology.current_host,
        topology.node_rank,
        list(topology.hosts),
        topology.workers_per_host,
        address,
        port,
    )
    config = LaunchConfig(
        min_nodes=len(topology.hosts),
        max_nodes=len(topology.hosts),
        nproc_per_node=topology.workers_per_host,
        run_id=run_id,
        rdzv_backend="static",
        rdzv_endpoint=f"{address}:{port}",
        rdzv_configs={"rank": topology.node_rank, "timeout": HOST_RESOLUTION_TIMEOUT_S},
        max_restarts=0,
        monitor_interval=1,
        start_method="spawn",
    )
    elastic_launch(config, entrypoint)(*args)
