"""Process-group setup and the data-parallel wrapper; nothing else knows about ranks.

``megabatch train`` runs unchanged under torchrun, SLURM's ``srun`` and Open
MPI's ``mpirun``: :func:`launch_environment` reads the rank, world size and
local rank from whichever launcher started the process, :func:`setup` starts
the process group (NCCL on GPUs, gloo on CPUs) and returns a small
:class:`DistInfo`, :func:`wrap_model` wraps the model in DDP with the recipe's
communication dtype. In fp16 or bf16, each process's gradient is divided by
sqrt(world size) in fp32, cast, summed, cast back and divided by sqrt(world size)
again (:func:`compress_hook`): DDP's own hooks cast first and divide by the whole
world size in fp16, where at hundreds of processes most small gradients fall
below fp16's normal range (at 512 processes, gradients of 1e-5 lost half their
value); the square root keeps both ends, underflow and overflow, sqrt(N) away.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import ipaddress
import math
import os
import re
import socket
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from megabatch.errors import UserError

# The dtype gradients travel in (a recipe's train.comm_dtype); compress_hook casts to it.
COMM_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``world_size == 1`` means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[003-010,012],cpu1" -> "gpu003",
    "rack[1-2]-node[01-04]" -> "rack1-node01"."""
    item = re.match(r"(?:[^,\[\]]|\[[^\]]*\])+", nodelist.strip())  # the first item, brackets whole
    if not item:
        raise UserError(f"cannot read SLURM_JOB_NODELIST={nodelist!r}: set MASTER_ADDR to the first node")
    return re.sub(r"\[([^\]]*)\]", lambda ranges: re.split(r"[,-]", ranges.group(1))[0], item.group(0))


def _number(env: Mapping[str, str], name: str, launcher: str, default: int | None = None) -> int:
    """A launcher's variable as a whole number; missing or malformed is a one-line error."""
    value = env.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        shown = " is not set" if value is None else f"={value!r} is not a whole number"
        raise UserError(f"{name}{shown}, but the other variables say {launcher} started this process: "
                        f"check how {launcher} sets it, or unset the variables of another launcher") from None


def _port(key: str) -> str:
    """A rendezvous port of this job's own (15000-29999), so that two jobs sharing a node
    do not meet at one port (each launcher's id for the job goes in ``key``)."""
    return str(15_000 + zlib.crc32(key.encode()) % 15_000)


def launch_environment(env: Mapping[str, str] | None = None) -> tuple[DistInfo, dict[str, str]]:
    """The launcher's rank, world size and local rank, and the variables to add so that
    ``init_process_group("env://")`` finds the rendezvous (MASTER_ADDR/MASTER_PORT).

    srun counts only inside a job step (SLURM_STEP_ID): a batch script or an salloc shell
    carries SLURM_PROCID=0 and the job's SLURM_NTASKS too, and a process started there
    alone must not wait for the job's other tasks. The step's own task count and nodes
    (SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST) win over the job's."""
    env = dict(os.environ if env is None else env)
    extra: dict[str, str] = {}
    port = None
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or set by hand
        launcher = "torchrun"
        info = DistInfo(_number(env, "RANK", launcher), _number(env, "WORLD_SIZE", launcher),
                        _number(env, "LOCAL_RANK", launcher, 0), launcher)
    elif "OMPI_COMM_WORLD_RANK" in env:  # mpirun (Open MPI)
        launcher = "mpirun"
        info = DistInfo(_number(env, "OMPI_COMM_WORLD_RANK", launcher), _number(env, "OMPI_COMM_WORLD_SIZE", launcher),
                        _number(env, "OMPI_COMM_WORLD_LOCAL_RANK", launcher, 0), launcher)
        job = env.get("PMIX_NAMESPACE") or env.get("OMPI_MCA_orte_hnp_uri")
        port = _port(job) if job else None
    elif "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):  # srun
        launcher = "srun"
        size = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        info = DistInfo(_number(env, "SLURM_PROCID", launcher), _number(env, size, launcher, 1),
                        _number(env, "SLURM_LOCALID", launcher, 0), launcher)
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if "MASTER_ADDR" not in env and nodelist:
            extra["MASTER_ADDR"] = first_host(nodelist)
        port = _port(f"{env.get('SLURM_JOB_ID', '')}.{env.get('SLURM_STEP_ID', env.get('SLURM_STEPID', ''))}")
    else:
        return DistInfo(), extra
    if info.world_size < 1 or not 0 <= info.rank < info.world_size or info.local_rank < 0:
        raise UserError(f"{launcher} says this is process {info.rank} (local {info.local_rank}) of "
                        f"{info.world_size}: a rank must be from 0 to the number of processes - 1; check "
                        f"how the processes were started")
    if info.world_size == 1 and launcher == "srun":  # a job step of one task
        return DistInfo(), {}
    if info.world_size > 1:
        if "MASTER_ADDR" not in env and "MASTER_ADDR" not in extra:
            raise UserError(f"started by {launcher} with {info.world_size} processes but MASTER_ADDR "
                            f"is not set: export MASTER_ADDR=<first node> (and MASTER_PORT) for every process")
        if "MASTER_PORT" not in env:
            extra["MASTER_PORT"] = port or "29500"
    return info, extra


def loopback_warning(info: DistInfo, env: Mapping[str, str], backend: str = "gloo",
                     hostname: str | None = None) -> str | None:
    """What to set when a run that spans several nodes would talk over loopback; None if fine.

    Two ways it goes wrong on hosts whose name resolves to 127.0.0.1 (see
    docs/multi-node.md): ``MASTER_ADDR`` (torchrun sets it from the rendezvous)
    is a loopback address, so the other nodes cannot reach the store; or (gloo)
    the host's name is, and gloo listens on loopback unless ``GLOO_SOCKET_IFNAME``
    names the interface. (NCCL picks an interface other than ``lo`` itself;
    ``NCCL_SOCKET_IFNAME`` chooses among several.) Only checked when the
    launcher says the processes span more than one node.
    """
    if not (info.distributed and _spans_nodes(info, env)):
        return None
    hints = []
    master = env.get("MASTER_ADDR", "")
    host = socket.gethostname() if hostname is None else hostname
    # This node's own name may resolve to loopback here and to its address elsewhere
    # (Debian's 127.0.1.1): only the other nodes can tell, so that case is left alone.
    own_name = master.split(".")[0].lower() == host.split(".")[0].lower() and master.lower() != "localhost"
    if master and not own_name and _is_loopback(master):
        hints.append(f"MASTER_ADDR={master} is a loopback address, which the other nodes cannot reach: under "
                     f"torchrun give every node --local-addr=<its own address> and the first node "
                     f"--rdzv-conf=is_host=1; under srun or mpirun export MASTER_ADDR=<the first node's address>")
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in env and _is_loopback(host):
        hints.append(f"this host's name {host} resolves to a loopback address, so gloo would listen there: "
                     f"export GLOO_SOCKET_IFNAME=<the network interface that joins the nodes, e.g. eth0>")
    if not hints:
        return None
    return f"{info.world_size} processes on several nodes: " + "; ".join(hints) + " (see docs/multi-node.md)"


def _spans_nodes(info: DistInfo, env: Mapping[str, str]) -> bool:
    """Whether the launcher says that not all processes run on this node."""
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):  # torchrun, mpirun
        if env.get(name, "").isdigit():
            return int(env[name]) < info.world_size
    return env.get("SLURM_NNODES", "1").isdigit() and int(env.get("SLURM_NNODES", "1")) > 1  # srun


def _is_loopback(host: str) -> bool:
    try:
        address = socket.getaddrinfo(host, None)[0][4][0]
    except (OSError, IndexError):  # unresolvable: init_process_group will say so
        return False
    return ipaddress.ip_address(address.split("%")[0]).is_loopback


def setup(device_kind: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Start the process group when a launcher started several processes; pin this
    process to its GPU. Returns the (possibly single-process) DistInfo."""
    info, extra = launch_environment()
    if not info.distributed:
        return info
    os.environ.update(extra)
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    use_cuda = torch.cuda.is_available() and device_kind != "cpu"
    warning = loopback_warning(info, os.environ, "nccl" if use_cuda else "gloo")
    if warning and info.local_rank == 0:  # once per node: a hang is what follows on the other nodes
        print(f"megabatch: warning: {warning}", file=sys.stderr, flush=True)
    if use_cuda:
        gpus = torch.cuda.device_count()
        # torchrun gives every process all of the node's GPUs, so a local rank past them
        # would share one, which NCCL refuses with a message about NCCL. srun and mpirun
        # setups often bind each process to its own GPU(s) (--gpus-per-task, a wrapper
        # setting CUDA_VISIBLE_DEVICES): there local ranks wrap around what a process sees.
        # A process that sees several GPUs was not bound to one: a local rank past them
        # would share one too.
        if info.local_rank >= gpus and (info.launcher == "torchrun" or gpus > 1):
            how = (f"torchrun --nproc-per-node={gpus}" if info.launcher == "torchrun"
                   else "or bind each task to its own GPU: srun --gpus-per-task=1")
            raise UserError(f"process {info.rank} is local rank {info.local_rank} on a node with {gpus} "
                            f"GPU{'s' if gpus > 1 else ''}: start at most {gpus} process{'es' if gpus > 1 else ''} "
                            f"per node ({how}), or train on the CPU with --set train.device=cpu")
        torch.cuda.set_device(info.local_rank % gpus)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://", rank=info.rank,
                            world_size=info.world_size, timeout=datetime.timedelta(seconds=timeout_s))
    return info


def teardown(info: DistInfo, clean: bool = True) -> None:
    """Leave the process group. After success all ranks meet at a barrier first (it
    avoids gloo aborts at exit); after a failure they don't wait for each other."""
    if info.distributed and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, comm_dtype: str) -> nn.Module:
    """DDP with gradients all-reduced in ``comm_dtype``; the model itself when alone.

    Buffers are not broadcast: every process keeps its own workers' batch-norm
    statistics, and :func:`megabatch.nn.average_bn_stats` averages them before
    evaluation and checkpoints.
    """
    if not info.distributed:
        return model
    device = next(model.parameters()).device
    # Newer torch names "no buffer sync in forward" forward_sync_buffers (buffers are then
    # synced once at start, where all ranks agree anyway); older torch broadcast_buffers.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  gradient_as_bucket_view=True, **no_buffer_sync)
    if COMM_DTYPES[comm_dtype] is not None:
        dtype = COMM_DTYPES[comm_dtype]
        # (a lambda: DDP checks a hook's annotations, and this module's are strings)
        ddp.register_comm_hook(None, lambda state, bucket: compress_hook(dtype, state, bucket))
    return ddp


def compress_hook(dtype: torch.dtype, group, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's communication hook: the bucket's mean over processes, sent in ``dtype``. The
    division by the world size N is split around the sum, sqrt(N) before the cast (in
    fp32) and sqrt(N) after it, so that neither small gradients underflow nor a sum of
    large ones overflows fp16 first (Horovod's pre-/post-divide factors)."""
    group = group if group is not None else dist.group.WORLD
    root = math.sqrt(dist.get_world_size(group))
    buffer = bucket.buffer()
    compressed = (buffer / root).to(dtype)
    future = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def decompress(done: torch.futures.Future) -> torch.Tensor:
        buffer.copy_(done.value()[0]).div_(root)
        return buffer

    return future.then(decompress)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of ``value`` over processes (in place); ``value`` itself when alone."""
    if info.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def accumulation(net: nn.Module, last: bool):
    """The context of one micro-batch's backward pass: DDP all-reduces only after the
    last micro-batch of a step (``no_sync`` before), so once per step."""
    if isinstance(net, DistributedDataParallel) and not last:
        return net.no_sync()
    return contextlib.nullcontext()


@torch.no_grad()
def round_gradients(model: nn.Module, info: DistInfo, comm_dtype: str) -> None:
    """Alone (no all-reduce), still pass the gradients through ``comm_dtype``, as one
    process's share goes through :func:`compress_hook`; under DDP the hook has done it.
    (The N-way sum of a real run rounds in ``comm_dtype`` too: one process emulating N
    workers sees the cast, not that sum's rounding.)"""
    dtype = COMM_DTYPES[comm_dtype]
    if dtype is None or info.distributed:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    # Two multi-tensor copies (to comm_dtype and back) instead of two kernels per parameter.
    narrow = [torch.empty_like(g, dtype=dtype) for g in grads]
    torch._foreach_copy_(narrow, grads)
    torch._foreach_copy_(grads, narrow)


def same_on_all_ranks(value, info: DistInfo):
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not info.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gathered(value, info: DistInfo) -> list:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if not info.distributed:
        return [value]
    values = [None] * info.world_size
    dist.all_gather_object(values, value)
    return values
