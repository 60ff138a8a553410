"""The run's backends and compilation: cuDNN autotuning, TF32, torch.compile and its
modes (CUDA graphs), each against the eager run it must equal."""

from __future__ import annotations

import pytest
import torch

from megabatch import recipe as recipes
from megabatch.build import backends, configure_backends, set_tf32
from megabatch.train import train_one_epoch

from runs import quiet_run, state_of


@pytest.mark.parametrize("layout, atol", [("contiguous", 1e-5), ("channels_last", 1e-4)])
def test_compiled_model_gives_the_eager_result(tmp_path, fashion_dir, layout, atol):
    """Eager channels-last BN on a CPU sums its statistics in float32 (about 3e-5 relative
    error at 256 images, 1e-7 in NCHW; Inductor's compiled BN is as exact as NCHW), hence
    the wider tolerance there. A wrong compiled model differs by orders of magnitude more."""
    results = []
    for compiled in (False, True):
        # SGD: RMSprop's g / sqrt(m) would magnify float32 rounding of near-zero gradients
        run = quiet_run(tmp_path / str(compiled), ["batch.global_batch=128", "train.max_steps=2", "optimizer.name=sgd",
                                                   f"train.compile={str(compiled).lower()}",
                                                   f"train.memory_format={layout}"])
        assert run.layout == getattr(torch, "channels_last" if layout == "channels_last" else "contiguous_format")
        train_one_epoch(run, 0)
        results.append(state_of(run.model))
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-4, atol=atol, msg=lambda m: f"{key}: {m}")


def test_the_recipes_compile_mode_reaches_torch_compile(tmp_path, fashion_dir, monkeypatch):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    for overrides in ([], ["train.compile=true"], ["train.compile=true", "train.compile_mode=reduce-overhead"]):
        quiet_run(tmp_path / str(len(overrides)), ["batch.global_batch=128", *overrides])
    assert modes == ["default", "reduce-overhead"]


def test_with_cuda_graphs_gradients_stay_the_runs_own_tensors(tmp_path, fashion_dir, monkeypatch):
    # A CUDA graph's outputs are overwritten at its next replay, so under "reduce-overhead" the
    # micro-batches add into gradients allocated once and zeroed after each step, never
    # freed. The mechanism, without the graphs (torch.compile left out): the same tensors
    # from step to step, and the same result as a run that frees them.
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: model)
    results = []
    for mode in ("default", "reduce-overhead"):
        run = quiet_run(tmp_path / mode, ["batch.global_batch=128", "batch.micro_batch=64", "train.max_steps=3",
                                          "train.compile=true", f"train.compile_mode={mode}"])
        assert run.keep_grads == (mode == "reduce-overhead")
        before = [p.grad for p in run.model.parameters()]
        train_one_epoch(run, 0)
        after = [p.grad for p in run.model.parameters()]
        if run.keep_grads:
            assert all(a is b for a, b in zip(after, before)) and all(not g.any() for g in after)
        else:
            assert all(g is None for g in before + after)
        results.append(state_of(run.model))
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=0, atol=0, msg=lambda m: f"{key}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("micro_batch", [128, 64])  # one micro-batch per step, or two adding their gradients
def test_cuda_graphs_replay_the_compiled_step(tmp_path, fashion_dir, micro_batch):
    # "reduce-overhead": the step's kernels recorded in CUDA graphs and replayed, with the
    # BN statistics and the optimizer outside them; the result is the eager one's.
    results = []
    for mode in ([], ["train.compile=true", "train.compile_mode=reduce-overhead"]):
        run = quiet_run(tmp_path / str(len(mode)), ["batch.global_batch=128", f"batch.micro_batch={micro_batch}",
                                                    "train.max_steps=4", "optimizer.name=sgd",
                                                    "train.device=cuda", *mode])
        train_one_epoch(run, 0)
        results.append({k: v.cpu() for k, v in state_of(run.model).items()})
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-4, atol=1e-4, msg=lambda m: f"{key}: {m}")


def test_cuda_runs_autotune_cudnn_unless_the_recipe_says_no(monkeypatch):
    # A process-wide flag: set on CUDA only, from train.cudnn_benchmark (default true).
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    configure_backends(torch.device("cpu"), recipes.load("fashion-mnist-demo"))
    assert torch.backends.cudnn.benchmark is False
    configure_backends(torch.device("cuda"), recipes.load("fashion-mnist-demo"))
    assert torch.backends.cudnn.benchmark is True
    configure_backends(torch.device("cuda"), recipes.load("fashion-mnist-demo", ["train.cudnn_benchmark=false"]))
    assert torch.backends.cudnn.benchmark is False


@pytest.fixture
def tf32_flags():
    """Both process-wide TF32 flags on, as PyTorch's default leaves cuDNN's; the process's
    flags back afterwards (on the CPU, backends() only saves and restores them)."""
    with backends(torch.device("cpu"), recipes.load("fashion-mnist-demo")):
        set_tf32(True)
        yield


def test_fp32_on_cuda_is_ieee_fp32_unless_the_recipe_allows_tf32(tf32_flags):
    # PyTorch's own default lets cuDNN's fp32 convolutions use TF32; a recipe's "fp32" is fp32.
    configure_backends(torch.device("cpu"), recipes.load("fashion-mnist-demo"))
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # the CPU: untouched
    configure_backends(torch.device("cuda"), recipes.load("fashion-mnist-demo"))
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"  # one consistent setting: PyTorch can still read it
    configure_backends(torch.device("cuda"), recipes.load("fashion-mnist-demo", ["train.tf32=true"]))
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    assert torch.get_float32_matmul_precision() == "high"


def test_backends_sets_a_runs_flags_for_a_block_then_gives_the_process_its_own_back(tf32_flags):
    benchmark = torch.backends.cudnn.benchmark
    with backends(torch.device("cuda"), recipes.load("fashion-mnist-demo", ["train.cudnn_benchmark=true"])):
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.benchmark is True
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.benchmark is benchmark
    with pytest.raises(RuntimeError), backends(torch.device("cuda"), recipes.load("fashion-mnist-demo")):
        raise RuntimeError("a failed measurement")
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # restored on error too
