"""Real data parallelism on CPU with gloo: launchers, fp16 all-reduce, exact
equivalence of processes with emulated workers, and crash-safe resume."""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from megabatch import checkpoint
from megabatch.distributed import (DistInfo, accumulation, compress_hook, first_host, launch_environment,
                                   round_gradients, wrap_model)
from megabatch.errors import UserError
from megabatch.build import find_checkpoint

DRIVER = str(Path(__file__).with_name("dist_driver.py"))
# 2,048 images, 8 workers x 32 = 256 per step, 8 steps per epoch, 2 epochs; checkpoints every 3 steps.
# On the CPU (gloo) also where a GPU is visible: two NCCL processes cannot share one GPU,
# and the equivalences below are exact only on the CPU.
RECIPE = ["--recipe", "fashion-mnist-demo", "--set", "train.device=cpu", "--set", "data.train_subset=2048", "--set", "data.test_subset=1000",
          "--set", "batch.global_batch=256", "--set", "batch.micro_batch=64", "--set", "train.epochs=2",
          "--set", "train.checkpoint_every=3", "--set", "data.augment=true",
          "--set", "optimizer.alpha_center=0.5", "--set", "optimizer.alpha_period=1.0",
          "--set", "schedule.boundaries=[1.0, 1.5, 1.8]", "--set", "train.comm_dtype=fp32",
          "--set", "train.precision=fp32"]


def torchrun(*args: str, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            DRIVER, *args]


def run_ok(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def descendants(pid: int) -> list[int]:
    """``pid`` and all its descendants (torchrun may put workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def kill_tree(pid: int) -> None:
    for p in descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def final_state(run_dir: Path) -> dict:
    return checkpoint.load(run_dir / "final.pt")


def assert_same_model(a: dict, b: dict) -> None:
    """Equal within float64 rounding, amplified over the run by RMSprop's g / sqrt(m)
    (seen: 1e-9 absolute on a BN mean of 0.015); the issue asks for 1e-5 relative."""
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-6, atol=1e-8, msg=lambda m: f"{key}: {m}")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, fashion_dir) -> tuple[Path, str]:
    """The reference: 2 gloo processes under torchrun, each emulating 4 of the 8 workers."""
    out = tmp_path_factory.mktemp("two") / "run"
    result = run_ok(torchrun("train", *RECIPE, "--out", str(out)))
    return out, result.stdout


# --- launchers ------------------------------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({}, DistInfo()),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h"}, DistInfo(3, 8, 1, "torchrun")),
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "5",
      "MASTER_ADDR": "h"}, DistInfo(5, 16, 5, "mpirun")),
    ({"SLURM_PROCID": "9", "SLURM_NTASKS": "32", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[003-010]",
      "SLURM_JOB_ID": "111", "SLURM_STEP_ID": "0"}, DistInfo(9, 32, 1, "srun")),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}, DistInfo()),  # one task: alone
    # a batch script or an salloc shell: the job's SLURM_NTASKS, but no step of srun's: alone
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost"}, DistInfo()),
    # the step's own size and nodes win over the job's (srun -n 2 -w gpu007 in a 32-task job)
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "32", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "3",
      "SLURM_JOB_NODELIST": "gpu[003-010]", "SLURM_STEP_NODELIST": "gpu007", "SLURM_JOB_ID": "111"},
     DistInfo(1, 2, 0, "srun")),
])
def test_launch_environment(env, expected):
    info, extra = launch_environment(env)
    assert info == expected
    if expected.launcher == "srun":
        first = "gpu007" if "SLURM_STEP_NODELIST" in env else "gpu003"
        assert extra["MASTER_ADDR"] == first and 15_000 <= int(extra["MASTER_PORT"]) < 30_000


def test_two_jobs_on_one_node_meet_at_ports_of_their_own():
    def port(**env):
        return launch_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1", **env})[1][
            "MASTER_PORT"]

    assert port(SLURM_JOB_ID="111", SLURM_STEP_ID="0") == port(SLURM_JOB_ID="111", SLURM_STEP_ID="0")
    assert len({port(SLURM_JOB_ID="111", SLURM_STEP_ID="0"), port(SLURM_JOB_ID="222", SLURM_STEP_ID="0"),
                port(SLURM_JOB_ID="111", SLURM_STEP_ID="1")}) == 3
    given = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1", "SLURM_STEP_ID": "0",
             "MASTER_PORT": "29511"}
    assert "MASTER_PORT" not in launch_environment(given)[1]  # the user's own port stands
    mpi = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "MASTER_ADDR": "h"}
    assert launch_environment({**mpi, "PMIX_NAMESPACE": "prterun-h-1234@1"})[1]["MASTER_PORT"] != \
        launch_environment({**mpi, "PMIX_NAMESPACE": "prterun-h-5678@1"})[1]["MASTER_PORT"]


@pytest.mark.parametrize("env, message", [
    ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc' is not a whole number, but the other variables say torchrun"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, "OMPI_COMM_WORLD_SIZE is not set, but the other variables say mpirun"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "", "SLURM_STEP_ID": "0"}, "SLURM_NTASKS='' is not a whole number"),
    ({"RANK": "5", "WORLD_SIZE": "4", "MASTER_ADDR": "h"}, "process 5 (local 0) of 4: a rank must be from 0"),
    ({"RANK": "0", "WORLD_SIZE": "-1", "MASTER_ADDR": "h"}, "process 0 (local 0) of -1"),
])
def test_launcher_variables_that_make_no_sense_are_one_line_errors(env, message):
    with pytest.raises(UserError, match=re.escape(message)):
        launch_environment(env)


def test_launch_without_rendezvous_address_is_a_clear_error():
    with pytest.raises(UserError, match="MASTER_ADDR is not set"):
        launch_environment({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"})


def test_more_processes_than_gpus_on_a_node_is_a_clear_error(monkeypatch):
    # Two ranks on one GPU: NCCL would refuse them with a message about NCCL; ours says what to do.
    from megabatch import distributed

    monkeypatch.setattr(distributed.os, "environ", {
        "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
        "LOCAL_WORLD_SIZE": "2"})
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: pytest.fail("joined a group"))
    with pytest.raises(UserError, match=r"process 1 is local rank 1 on a node with 1 GPU: start at most "
                                        r"1 process per node \(torchrun --nproc-per-node=1\), or train on "
                                        r"the CPU with --set train.device=cpu"):
        distributed.setup("auto")


def test_srun_tasks_bound_to_their_own_gpu_wrap_around_it(monkeypatch):
    # srun --gpus-per-task=1: local rank 3 of 8 sees one GPU, its own.
    from megabatch import distributed

    # setup() writes RANK and WORLD_SIZE into the environment: give it one of its own.
    monkeypatch.setattr(distributed.os, "environ", {
        "SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "MASTER_ADDR": "n1",
        "MASTER_PORT": "29500", "SLURM_NNODES": "1", "SLURM_STEP_ID": "0"})
    chosen, joined = [], []
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **k: joined.append(backend))
    info = distributed.setup("auto")
    assert (info.rank, info.local_rank, info.launcher) == (3, 3, "srun")
    assert chosen == [0] and joined == ["nccl"]


def test_srun_tasks_that_see_every_gpu_may_not_share_one(monkeypatch):
    # No binding: each of 8 tasks sees the node's 4 GPUs; local rank 5 would take GPU 1 beside rank 1.
    from megabatch import distributed

    monkeypatch.setattr(distributed.os, "environ", {
        "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "5", "MASTER_ADDR": "n1",
        "MASTER_PORT": "29500", "SLURM_NNODES": "1", "SLURM_STEP_ID": "0"})
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: pytest.fail("joined a group"))
    with pytest.raises(UserError, match=r"local rank 5 on a node with 4 GPUs: start at most 4 processes per node "
                                        r"\(or bind each task to its own GPU: srun --gpus-per-task=1\)"):
        distributed.setup("auto")


@pytest.mark.parametrize("nodelist, host", [
    ("node7", "node7"), ("gpu[003-010,012]", "gpu003"), ("a[1,4],b2", "a1"), ("x-1", "x-1"),
    ("node[1-2]-ib", "node1-ib"), ("rack[1-2]-node[01-04]", "rack1-node01"), ("gpu[01-04,07],login1", "gpu01"),
])
def test_first_host_of_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


# --- fp16 all-reduce ------------------------------------------------------------------

class Scaled(nn.Module):
    """loss = sum(w * c): the gradient of w is c, chosen per rank by the test."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return (self.w * c).sum()


def _grads_worker(rank: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        info = DistInfo(rank, 2, rank, "test")
        g = torch.Generator().manual_seed(rank)
        random_c = torch.randn(1000, generator=g) * 10.0 ** torch.randint(-3, 3, (1000,), generator=g)
        huge_c = torch.full((8,), 45000.0 if rank == 0 else 40000.0)  # the sum 85000 > fp16 max 65504
        out = {"c": random_c}
        for name, c in (("random", random_c), ("huge", huge_c)):
            for dtype in ("fp32", "fp16", "bf16"):
                net = wrap_model(Scaled(len(c)), info, dtype)
                net(c).backward()
                out[name, dtype] = net.module.w.grad.clone()
        out["hook_calls"] = count_all_reduces_per_step(info)
        results[rank] = out
        dist.barrier()
    finally:
        dist.destroy_process_group()


def count_all_reduces_per_step(info: DistInfo) -> tuple[int, int]:
    """All-reduce calls for one step of 4 micro-batches, with and without no_sync."""
    calls = []

    from megabatch import distributed

    def counting_hook(dtype, state, bucket):
        calls.append(1)
        return compress_hook(dtype, state, bucket)

    counts = []
    for sync_every_micro_batch in (False, True):
        calls.clear()
        with mock.patch.object(distributed, "compress_hook", counting_hook):
            net = wrap_model(nn.Linear(4, 2), info, "fp16")
            for i in range(4):
                with accumulation(net, last=sync_every_micro_batch or i == 3):
                    net(torch.randn(3, 4)).sum().backward()
        counts.append(len(calls))
    return tuple(counts)


@pytest.fixture(scope="module")
def reduced_grads(tmp_path_factory):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_grads_worker, args=(str(tmp_path_factory.mktemp("g") / "init"), results), nprocs=2)
        return dict(results)


def test_fp16_and_bf16_all_reduce_agree_with_fp32_within_rounding(reduced_grads):
    exact = reduced_grads[0]["random", "fp32"]
    halves = (reduced_grads[0]["c"].abs() + reduced_grads[1]["c"].abs()) / 2
    for dtype, eps in (("fp16", 2.0 ** -11), ("bf16", 2.0 ** -8)):  # unit roundoff
        got = reduced_grads[0]["random", dtype]
        assert torch.equal(got, reduced_grads[1]["random", dtype])  # every rank gets the same
        # each half is rounded once when compressed, the sum once more; fp16 below its
        # normal range (6.1e-5) has an absolute spacing of 6e-8
        err = (got - exact).abs()
        bound = eps * halves + eps * exact.abs() + 1.2e-7
        assert bool((err <= bound).all()), f"{dtype}: worst {(err - bound).max().item():.3g}"
        assert not torch.equal(got, exact)  # the compression really happened


def test_one_all_reduce_per_step_not_per_micro_batch(reduced_grads):
    assert reduced_grads[0]["hook_calls"] == (1, 4)  # one bucket: once per step; 4 without no_sync


def test_a_single_process_rounds_gradients_through_the_comm_dtype():
    model = nn.Linear(3, 1)
    model(torch.randn(5, 3)).sum().backward()
    exact = model.weight.grad.clone()
    round_gradients(model, DistInfo(), "fp32")
    assert torch.equal(model.weight.grad, exact)
    round_gradients(model, DistInfo(), "fp16")
    assert torch.equal(model.weight.grad, exact.half().float())


def test_fp16_gradients_are_divided_by_the_root_of_the_world_size_before_and_after_the_sum(reduced_grads):
    # mean of 45000 and 40000: summing undivided would overflow fp16 (85000 > 65504) to inf;
    # each divided by sqrt(2) in fp32, cast, summed in fp16, divided by sqrt(2) again
    half, root = torch.float16, 2 ** 0.5
    expected = ((torch.tensor(45000.0 / root).to(half) + torch.tensor(40000.0 / root).to(half)).float() / root)
    assert torch.equal(reduced_grads[0]["huge", "fp16"], torch.full((8,), expected.item()))
    assert abs(expected.item() - 42500.0) < 32
    assert torch.isinf(torch.tensor(45000.0, dtype=half) + torch.tensor(40000.0, dtype=half))
    assert torch.equal(reduced_grads[0]["huge", "fp32"], torch.full((8,), 42500.0))


class SummedInFp16:
    """A stand-in for the all-reduce of ``world`` processes that all hold the same
    tensor: it sums the copies one by one in the tensor's dtype, as a ring does."""

    def __init__(self, world: int) -> None:
        self.world = world

    def all_reduce(self, tensor, group=None, async_op=False):
        total = tensor.clone()
        for _ in range(self.world - 1):
            total += tensor
        tensor.copy_(total)
        future = torch.futures.Future()
        future.set_result([tensor])
        return mock.Mock(get_future=lambda: future)


def test_small_gradients_survive_the_fp16_mean_of_hundreds_of_processes(monkeypatch):
    """At 512 processes, DDP's own fp16 hook (cast, then divide by 512 in fp16) puts
    gradients of 1e-6 to 1e-4 into fp16's subnormals, the smallest to zero; dividing by
    sqrt(512) on each side of the sum keeps them all, within the sum's own rounding."""
    from megabatch import distributed

    world = 512
    fake = SummedInFp16(world)
    monkeypatch.setattr(distributed.dist, "all_reduce", fake.all_reduce)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group=None: world)
    g = torch.linspace(1e-6, 1e-4, 1000)

    class Bucket:
        def __init__(self):
            self.data = g.clone()

        def buffer(self):
            return self.data

    ours = compress_hook(torch.float16, object(), Bucket()).wait()
    torchs = (g.half() / world)  # DDP's fp16_compress_hook: cast, divide, then the sum
    total = torchs.clone()
    for _ in range(world - 1):
        total += torchs
    theirs = total.float()
    error = lambda got: ((got - g).abs() / g).median().item()
    # the sum's own fp16 rounding (a ring adds one process's share per hop) stays in both
    assert error(ours) < 0.05 and error(theirs) > 0.1
    assert (ours > 0).all() and (theirs[:10] == 0).all()  # the smallest flushed to zero by DDP's


# --- equivalence: 2 processes x 4 workers == 1 process x 8 workers ---------------------

def test_two_processes_equal_one_process_emulating_all_workers(two_process_run, tmp_path):
    two, stdout = two_process_run
    one = tmp_path / "one"
    run_ok([sys.executable, DRIVER, "train", *RECIPE, "--out", str(one)])
    assert_same_model(final_state(one), final_state(two))
    m1 = [json.loads(l) for l in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(l) for l in (two / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(m1, m2, strict=True):
        assert a["test_top1"] == b["test_top1"] and a["test_top5"] == b["test_top5"]
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-7)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-7)
    assert "2 processes x 4 emulated workers" in stdout
    assert stdout.count("\nepoch ") == 2  # logs from rank 0 only


def test_resume_after_sigkill_ends_like_an_uninterrupted_run(two_process_run, tmp_path):
    reference, _ = two_process_run
    out = tmp_path / "killed"
    env = {**os.environ, "MEGABATCH_TEST_SLOW_AFTER": "4"}
    proc = subprocess.Popen(torchrun("train", *RECIPE, "--out", str(out)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step-00000006.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "run ended before the kill"
            time.sleep(0.05)
    finally:
        kill_tree(proc.pid)
        proc.wait()
    assert not (out / "final.pt").exists()
    killed_at = find_checkpoint(out)["iteration"]
    assert 6 <= killed_at < 16
    assert proc.returncode == -signal.SIGKILL  # killed, not failed

    result = run_ok(torchrun("train", "--resume", str(out)))
    assert f"resuming from {out / 'checkpoints'}" in result.stdout
    assert_same_model(final_state(reference), final_state(out))
    ref_metrics = (reference / "metrics.jsonl").read_text().splitlines()
    got_metrics = (out / "metrics.jsonl").read_text().splitlines()
    assert len(got_metrics) == len(ref_metrics) == 2
    for a, b in zip(ref_metrics, got_metrics):
        a, b = json.loads(a), json.loads(b)
        assert (a["iteration"], a["test_top1"]) == (b["iteration"], b["test_top1"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-7)


def test_sigterm_stops_after_a_step_with_a_checkpoint_and_resume_ends_like_an_uninterrupted_run(
        two_process_run, tmp_path):
    """A cluster's time limit: SIGTERM to torchrun and its workers mid-epoch. Every rank
    finishes its step, rank 0 checkpoints, the run exits 75; --resume then ends equal."""
    reference, _ = two_process_run
    out = tmp_path / "stopped"
    env = {**os.environ, "MEGABATCH_TEST_SLOW_AFTER": "4"}
    proc = subprocess.Popen(torchrun("train", *RECIPE, "--out", str(out)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step-00000006.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "run ended before the signal"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        kill_tree(proc.pid)
    assert "stopped by a signal" in err and "megabatch train --resume" in err
    assert not (out / "final.pt").exists()
    stopped_at = find_checkpoint(out)["iteration"]
    assert 7 <= stopped_at < 16

    result = run_ok(torchrun("train", "--resume", str(out)))
    assert f"iteration {stopped_at}" in result.stdout
    assert_same_model(final_state(reference), final_state(out))


def run_state(iteration: int) -> dict:
    return {"model": {}, "recipe": {}, "iteration": iteration, "epoch": 0}


def _choosing_worker(rank: int, init_file: str, run_dir: str, unreadable: bool, results) -> None:
    """Rank 1's listing lags (a shared disk): it sees step 3 alone. With ``unreadable``, it
    cannot read the file rank 0 chose either."""
    from megabatch import build

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        if rank == 1:
            listing = checkpoint.list_checkpoints
            checkpoint.list_checkpoints = lambda folder: listing(folder)[:1]
            if unreadable:
                def load(path, **kwargs):
                    raise UserError(f"checkpoint {path} does not exist")
                checkpoint.load = load
        try:
            results[rank] = build.chosen_checkpoint(Path(run_dir), DistInfo(rank, 2, rank, "test"))["iteration"]
        except UserError as e:
            results[rank] = str(e)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("unreadable", [False, True])
def test_every_process_resumes_from_the_checkpoint_rank_0_chose(tmp_path, unreadable):
    for it in (3, 6):
        checkpoint.save(run_state(it), checkpoint.step_path(tmp_path / "checkpoints", it))
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_choosing_worker, args=(str(tmp_path / "init"), str(tmp_path), unreadable, results), nprocs=2)
        results = dict(results)
    if not unreadable:
        assert results == {0: 6, 1: 6}  # not 3 on rank 1: a step that mixed the two would be wrong
    else:
        message = (f"not every process can read the checkpoint rank 0 chose, {tmp_path}/checkpoints/step-00000006.pt: "
                   f"rank 1: checkpoint {tmp_path}/checkpoints/step-00000006.pt does not exist")
        assert results == {0: message, 1: message}


def test_truncated_newest_checkpoint_is_skipped(tmp_path):
    folder = tmp_path / "checkpoints"
    for it in (3, 6):
        checkpoint.save(run_state(it), checkpoint.step_path(folder, it))
    newest = checkpoint.step_path(folder, 6)
    newest.write_bytes(newest.read_bytes()[:100])
    notes = []
    assert find_checkpoint(tmp_path, notes.append)["iteration"] == 3
    assert "skipping step-00000006.pt" in notes[0]


def test_a_failing_rank_reports_one_line_naming_it(tmp_path):
    result = subprocess.run(torchrun("train", "--recipe", "fashion-mnist-demo", "--data", str(tmp_path / "none"),
                                     "--out", str(tmp_path / "r"), "--set", "train.device=cpu"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = [l for l in result.stderr.splitlines() if l.startswith("megabatch: error:")]
    assert any(l.startswith("megabatch: error: rank 1/2: Fashion-MNIST not found") for l in lines), result.stderr
    # torchrun prints its own summary (with a traceback of torchrun); ours print none
    assert "src/megabatch" not in result.stderr and "dist_driver.py\", line" not in result.stderr
