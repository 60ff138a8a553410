"""The trainer: emulated workers compute what a real cluster computes, micro_batch is
only a memory knob, and runs on real data end to end."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from megabatch import checkpoint, models, recipe as recipes
from megabatch.batching import BatchPlan, epoch_order
from megabatch.cli import main
from megabatch.nn import batch_norm_layers
from megabatch.progress import Progress
from megabatch.provenance import cpu_summary
from megabatch.build import build_optimizer, build_run
from megabatch.train import recompute_bn_statistics, set_hyperparameters, train_one_epoch, train_step
from megabatch.schedules import recipe_values

from runs import quiet_run, state_of


@pytest.fixture
def float64():
    """Run in float64: RMSprop's g / sqrt(m) turns float32 rounding of near-zero
    gradients into visible differences, float64 keeps the comparison tight."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("optimizer, tolerance", [("rmsprop_warmup", 1e-9), ("sgd", 1e-9)])
def test_micro_batch_does_not_change_the_result(tmp_path, fashion_dir, float64, optimizer, tolerance):
    results = []
    for micro in (32, 128, 256):
        run = quiet_run(tmp_path / str(micro), ["batch.global_batch=256", f"batch.micro_batch={micro}",
                                                "train.max_steps=3", "data.augment=true",
                                                f"optimizer.name={optimizer}"])
        assert run.plan.micro_batches == 256 // micro
        train_one_epoch(run, 0)
        results.append(state_of(run.model))
    for other in results[1:]:
        for key, value in results[0].items():
            torch.testing.assert_close(other[key], value, rtol=tolerance, atol=tolerance,
                                       msg=lambda m: f"{key}: {m}")


def test_emulated_workers_equal_separate_workers(tmp_path, fashion_dir, float64):
    """Reference: one model, each worker's 32 images in its own forward pass (plain
    BatchNorm2d, momentum 1), gradients summed over workers of the mean over the global
    batch, stored statistics averaged over workers after the step."""
    workers, per_worker, steps = 4, 32, 3
    run = quiet_run(tmp_path, [f"batch.global_batch={workers * per_worker}", "batch.micro_batch=64",
                               f"train.max_steps={steps}"])
    recipe = run.recipe
    reference = models.create("small-cnn", 10, 1).double()
    reference.load_state_dict(run.model.state_dict())
    for layer in batch_norm_layers(reference):
        layer.momentum = 1.0
    optimizer = build_optimizer(recipe, reference)
    order = epoch_order(recipe.train.seed, 0, len(run.train_data))
    steps_per_epoch = run.steps_per_epoch
    for step in range(steps):
        set_hyperparameters(optimizer, *recipe_values(recipe, step / steps_per_epoch, steps_per_epoch))
        index = order[step * workers * per_worker:(step + 1) * workers * per_worker]
        stats = []
        for w in range(workers):
            x, y = run.train_data.batch(index[w * per_worker:(w + 1) * per_worker])
            loss = F.cross_entropy(reference(x), y, reduction="sum") / len(index)
            loss.backward()
            stats.append([(l.running_mean.clone(), l.running_var.clone()) for l in batch_norm_layers(reference)])
        for i, layer in enumerate(batch_norm_layers(reference)):
            layer.running_mean.copy_(torch.stack([s[i][0] for s in stats]).mean(0))
            layer.running_var.copy_(torch.stack([s[i][1] for s in stats]).mean(0))
        optimizer.step()
        optimizer.zero_grad()

    train_one_epoch(run, 0)
    assert run.iteration == steps
    ours = run.model.state_dict()
    for key, value in reference.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert int(ours[key]) == steps
            continue
        torch.testing.assert_close(ours[key], value, rtol=1e-9, atol=1e-9, msg=lambda m: f"{key}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("optimizer", ["rmsprop_warmup", "sgd"])
def test_a_cuda_run_computes_what_the_cpu_run_does(tmp_path, fashion_dir, float64, optimizer):
    # The same three steps (ghost BN over 4 workers in 2 micro-batches, augmentation, the
    # BN statistics of the step) on the GPU and on the CPU, in float64.
    results = {}
    for device in ("cpu", "cuda"):
        run = quiet_run(tmp_path / device, ["batch.global_batch=128", "batch.micro_batch=64", "train.max_steps=3",
                                            "data.augment=true", f"optimizer.name={optimizer}",
                                            f"train.device={device}"])
        assert run.device.type == device
        train_one_epoch(run, 0)
        results[device] = {k: v.cpu() for k, v in state_of(run.model).items()}
    for key, value in results["cpu"].items():
        torch.testing.assert_close(results["cuda"][key], value, rtol=1e-7, atol=1e-9, msg=lambda m: f"{key}: {m}")


def host_reads_of_a_step(run) -> tuple[int, int]:
    """(reads of a tensor's value on the host, operators) in the second step of ``run``: on
    a GPU every such read (.item(), int(), a blocking copy) waits for the device and stalls
    its queue. Counted on the CPU by the dispatcher (the step's one .tolist() of the agreed
    loss does not dispatch here)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads, self.ops = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            self.reads += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    batches = run.train_data.training_batches(run.plan.epoch(epoch_order(0, 0, len(run.train_data)), 0),
                                              0, True, run.device)
    train_step(run, next(batches))  # the optimizer's state is created in the first step
    with Reads() as counted:
        train_step(run, next(batches))
    return counted.reads, counted.ops


@pytest.mark.parametrize("micro_batch", [64, 32])  # two workers per pass, or one
def test_a_step_reads_no_tensor_on_the_host_but_its_loss(tmp_path, fashion_dir, micro_batch):
    run = quiet_run(tmp_path, ["batch.global_batch=128", f"batch.micro_batch={micro_batch}", "train.max_steps=2",
                               "data.augment=true"])
    reads, ops = host_reads_of_a_step(run)
    assert reads == 0 and ops > 100  # (the mode saw the step)


def test_the_noise_scale_adds_no_host_read_to_an_fp16_step(tmp_path, fashion_dir):
    # fp16's GradScaler reads whether the gradients overflowed (PyTorch's own design); the
    # noise-scale estimate, which needs its scale, adds no read per micro-batch to that.
    reads = {on: host_reads_of_a_step(quiet_run(tmp_path / str(on), [
        "batch.global_batch=128", "batch.micro_batch=32", "train.max_steps=2", "train.precision=fp16",
        f"train.noise_scale={str(on).lower()}"]))[0] for on in (False, True)}
    assert reads[True] == reads[False]


def test_paper_scale_1024_workers_run_with_memory_bounded_by_micro_batch(tmp_path, fashion_dir):
    recipe = recipes.load("fashion-mnist-paper", ["batch.global_batch=32768", "batch.micro_batch=512",
                                                  "train.max_steps=1", "train.epochs=1"])
    run = build_run(recipe, None, tmp_path, Progress(1, 1, enabled=False))
    assert (run.plan.workers, run.plan.micro_batches) == (1024, 64)
    seen = []
    run.model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape[0]))
    before = state_of(run.model)
    metrics = train_one_epoch(run, 0)
    assert run.iteration == 1 and len(seen) == 64 and max(seen) == 512
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert not torch.equal(before["0.weight"], run.model.state_dict()["0.weight"])


def test_end_to_end_on_real_data_then_eval(tmp_path, capsys, fashion_dir):
    out = tmp_path / "run"
    code = main(["train", "--recipe", "fashion-mnist-demo", "--out", str(out), "--set", "train.device=cpu",
                 "--set", "data.train_subset=8192", "--set", "data.test_subset=2000",
                 "--set", "batch.global_batch=512", "--set", "train.epochs=3",
                 "--set", "optimizer.alpha_center=1.0", "--set", "optimizer.alpha_period=1.0",
                 "--set", "schedule.boundaries=[2.0, 2.5, 2.8]"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "global batch 512 = 16 workers x 32 images" in printed
    assert "lr = 0.1 per 256 x 512/256 = 0.2" in printed
    assert "steps; device cpu (" in printed and cpu_summary() in printed  # why "auto" chose its precision
    assert printed.count("\nepoch ") == 3  # one plain line per epoch off a terminal
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    for key in ("train_loss", "test_top1", "test_top5", "lr", "alpha_sgd", "images_per_s", "wall_time_s"):
        assert key in lines[-1]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert lines[-1]["test_top1"] > 70.0 and lines[-1]["test_top5"] > 95.0
    assert (out / "curves.png").stat().st_size > 1000
    assert recipes.load(str(out / "recipe.toml")).batch.global_batch == 512
    assert json.loads((out / "run.json").read_text())["torch"] == torch.__version__

    state = checkpoint.load(out / "final.pt")
    models.create("small-cnn", 10, 1).load_state_dict(state["model"], strict=True)
    assert main(["eval", "--checkpoint", str(out / "final.pt")]) == 0
    assert f"stored BN statistics: top-1 {lines[-1]['test_top1']:.2f}%" in capsys.readouterr().out
    saved = (out / "final.pt").read_bytes()
    assert main(["eval", "--checkpoint", str(out / "final.pt"), "--recompute-bn"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].startswith(f"  stored BN statistics: top-1 {lines[-1]['test_top1']:.2f}%")
    recomputed = printed[2]  # from another batch of 512 than the last step's: close, not equal
    assert recomputed.startswith("  BN statistics of 512 training images (16 workers x 32): top-1 ")
    assert abs(float(recomputed.split("top-1 ")[1].split("%")[0]) - lines[-1]["test_top1"]) < 3.0
    assert (out / "final.pt").read_bytes() == saved  # eval writes nothing


def test_diverged_run_stops_with_exit_1_and_keeps_the_last_good_checkpoint(tmp_path, capsys, fashion_dir):
    out = tmp_path / "run"
    code = main(["train", "--recipe", "fashion-mnist-demo", "--out", str(out), "--set", "train.device=cpu",
                 "--set", "data.train_subset=1024", "--set", "data.test_subset=500",
                 "--set", "batch.global_batch=256", "--set", "train.epochs=3",
                 "--set", "optimizer.name=sgd", "--set", "schedule.boundaries=[1.0]",
                 "--set", "schedule.factors=[0.01, 1e30]"])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "training diverged" in err and "at epoch 2, iteration 5 (step 2 of the epoch)" in err
    good = out / "checkpoints" / "step-00000004.pt"
    assert str(good) in err and checkpoint.load(good)["epoch"] == 1


def test_paper_recipe_with_resnet50_checkpoint_loads_into_torchvision(tmp_path, capsys):
    import torchvision

    out = tmp_path / "r50"
    assert main(["train", "--recipe", "paper-resnet50-imagenet-32k", "--out", str(out),
                 "--set", "data.dataset=synthetic", "--set", "data.synthetic_size=[64, 16, 32, 3, 1000]",
                 "--set", "batch.global_batch=64", "--set", "train.max_steps=1"]) == 0
    assert "global batch 64 = 2 workers x 32 images" in capsys.readouterr().out
    state = checkpoint.load(out / "final.pt")
    assert state["iteration"] == 1
    torchvision.models.resnet50().load_state_dict(state["model"], strict=True)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_checkpoints_its_scaler(tmp_path, fashion_dir, precision):
    run = quiet_run(tmp_path, ["batch.global_batch=256", "train.max_steps=3", f"train.precision={precision}"])
    before = state_of(run.model)
    metrics = train_one_epoch(run, 0)
    assert run.iteration == 3 and metrics["train_loss"] < 2.5
    assert not torch.equal(before["0.weight"], run.model.state_dict()["0.weight"])
    assert run.model.state_dict()["0.weight"].dtype == torch.float32  # master weights stay fp32
    state = run.state_dict(0)
    assert ("scaler" in state) == (precision == "fp16")
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0


def test_tensorboard_event_files_hold_the_logged_metrics(tmp_path, capsys, fashion_dir):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    assert main(["train", "--recipe", "fashion-mnist-demo", "--out", str(out), "--set", "train.tensorboard=true",
                 "--set", "data.train_subset=512", "--set", "data.test_subset=200", "--set", "train.epochs=2",
                 "--set", "batch.global_batch=32", "--set", "train.precision=fp32"]) == 0
    assert "global batch 32 = 1 worker x 32 images; 1 process x 1 emulated worker" in capsys.readouterr().out
    events = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "lr", "alpha_sgd", "images_per_s", "test_top1", "test_loss"} <= tags
    assert len(events.Scalars("train_loss")) == 2 * 16  # every step
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = events.Scalars("test_top1")
    assert [e.step for e in logged] == [m["iteration"] for m in metrics]
    assert [e.value for e in logged] == pytest.approx([m["test_top1"] for m in metrics], rel=1e-6)


def test_noise_scale_is_measured_without_changing_training(tmp_path, fashion_dir, float64, monkeypatch):
    """Training with the measurement on changes no bit, and the measurement is what
    McCandlish et al.'s estimators give on the micro-batches' own gradients, computed here
    apart with torch.autograd on a copy of the model before each step: per step
    |G_small|^2 = mean_i |g_i|^2 (b = 64 images), |G_big|^2 = |mean_i g_i|^2 (B = 256),
    |G|^2 ~ (B |G_big|^2 - b |G_small|^2) / (B - b), tr(Sigma) ~ (|G_small|^2 - |G_big|^2)
    / (1/b - 1/B), each smoothed by a bias-corrected EMA (beta 0.99), and B_simple their ratio."""
    import copy

    from megabatch import train as train_module

    b, big_b = 64, 256
    per_step = []  # (|G|^2, tr(Sigma)) of each step, computed here
    real_train_step = train_module.train_step

    def measured_apart(run, micro_batches):
        micro_batches = list(micro_batches)
        model = copy.deepcopy(run.model).train()
        params = [p for p in model.parameters() if p.requires_grad]
        grads = []
        for x, y in micro_batches:
            loss = F.cross_entropy(model(x), y, label_smoothing=run.recipe.train.label_smoothing)
            grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
        grads = torch.stack(grads).double()
        assert grads.shape[0] == big_b // b
        small = grads.square().sum(1).mean().item()
        big = grads.mean(0).square().sum().item()
        per_step.append(((big_b * big - b * small) / (big_b - b), (small - big) / (1 / b - 1 / big_b)))
        return real_train_step(run, micro_batches)

    results, noise = [], None
    for on in (False, True):
        run = quiet_run(tmp_path / str(on), ["batch.global_batch=256", f"batch.micro_batch={b}",
                                             "train.max_steps=4", f"train.noise_scale={str(on).lower()}"])
        if on:
            monkeypatch.setattr(train_module, "train_step", measured_apart)
        train_one_epoch(run, 0)
        results.append(state_of(run.model))
        noise = run.noise
    for key, value in results[0].items():
        assert torch.equal(results[1][key], value), key  # the measurement changes no bit
    assert len(per_step) == noise.updates == 4
    beta = 0.99
    weights = [(1 - beta) * beta ** (3 - t) / (1 - beta ** 4) for t in range(4)]
    grad_sq_norm = sum(w * g for w, (g, _) in zip(weights, per_step))
    trace_sigma = sum(w * s for w, (_, s) in zip(weights, per_step))
    assert grad_sq_norm > 0 and trace_sigma > 0
    # (the trainer's squared norms are float32: agreement to ~1e-7 here, 1e-5 allowed)
    assert noise.grad_sq_norm == pytest.approx(grad_sq_norm, rel=1e-5)
    assert noise.trace_sigma == pytest.approx(trace_sigma, rel=1e-5)
    assert noise.noise_scale == pytest.approx(trace_sigma / grad_sq_norm, rel=2e-5)


def test_the_noise_scale_in_fp16_is_that_of_the_unscaled_gradients(tmp_path, fashion_dir):
    # fp16's GradScaler multiplies every gradient by 65,536: the estimate divides it out.
    noise = {}
    for precision in ("fp32", "fp16"):
        run = quiet_run(tmp_path / precision, ["batch.global_batch=256", "batch.micro_batch=64",
                                               "train.max_steps=1", f"train.precision={precision}",
                                               "train.noise_scale=true"])
        train_one_epoch(run, 0)
        noise[precision] = (run.noise.grad_sq_norm, run.noise.trace_sigma)
    assert run.scaler is not None and run.scaler.get_scale() > 1000
    assert noise["fp16"] == pytest.approx(noise["fp32"], rel=0.02)


def test_diverged_run_with_step_checkpoints_names_one_that_resumes(tmp_path, capsys, fashion_dir):
    """The weights go non-finite one step before the loss does: that step is never
    saved, and the checkpoint the message names evaluates and resumes."""
    out = tmp_path / "run"
    assert main(["train", "--recipe", "fashion-mnist-demo", "--out", str(out), "--set", "train.checkpoint_every=1",
                 "--set", "data.train_subset=1024", "--set", "data.test_subset=200", "--set", "batch.global_batch=256",
                 "--set", "train.epochs=3", "--set", "optimizer.name=sgd", "--set", "schedule.boundaries=[1.0]",
                 "--set", "schedule.factors=[0.01, 1e30]", "--set", "train.precision=fp32"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training diverged" in err and "at epoch 2" in err
    named = err.split("the last good checkpoint is ")[1].split(";")[0]
    assert named == str(checkpoint.list_checkpoints(out / "checkpoints")[-1])
    for path in checkpoint.list_checkpoints(out / "checkpoints"):
        checkpoint.load(path, require_finite=True)  # no checkpoint with a non-finite weight was written
    assert main(["eval", "--checkpoint", named]) == 0


def test_a_resumed_run_keeps_the_provenance_of_every_earlier_attempt(tmp_path, fashion_dir):
    """run.json describes the newest attempt and lists the earlier ones, oldest first: a
    study's run continued across sessions may span commits and machines."""
    out = tmp_path / "run"
    args = ["--set", "train.checkpoint_every=1", "--set", "data.train_subset=512", "--set", "data.test_subset=200",
            "--set", "batch.global_batch=256", "--set", "train.epochs=1", "--set", "train.precision=fp32"]
    assert main(["train", "--recipe", "fashion-mnist-demo", "--out", str(out), *args]) == 0
    first = json.loads((out / "run.json").read_text())
    recipe = (out / "recipe.toml").read_text()
    assert recipe.startswith("# resolved recipe (from fashion-mnist-demo)")
    assert "cpu" in first and "attempts" not in first and "resumed_from" not in first
    for _ in range(2):
        assert main(["train", "--resume", str(out)]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["resumed_from"].endswith(".pt") and len(info["attempts"]) == 2
    assert info["attempts"][0] == first and info["attempts"][1]["resumed_from"] == info["resumed_from"]
    assert "attempts" not in info["attempts"][1]
    assert (out / "recipe.toml").read_text() == recipe  # still says where it came from


SMALL = ["--set", "train.checkpoint_every=1", "--set", "data.train_subset=512", "--set", "data.test_subset=200",
         "--set", "batch.global_batch=256", "--set", "train.epochs=2", "--set", "train.precision=fp32",
         "--set", "train.keep_checkpoints=10"]


def cut_short(out, iteration: int) -> None:
    """The run as a crash after ``iteration`` leaves it: no final.pt, no later checkpoint."""
    (out / "final.pt").unlink()
    for path in checkpoint.list_checkpoints(out / "checkpoints"):
        if checkpoint.load(path)["iteration"] > iteration:
            path.unlink()


def test_a_resume_refuses_a_recipe_that_computes_something_else(tmp_path, capsys, fashion_dir):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "fashion-mnist-demo", "--out", str(out), *SMALL]) == 0
    cut_short(out, 2)
    toml = out / "recipe.toml"
    kept = toml.read_text()
    toml.write_text(kept.replace("global_batch = 256", "global_batch = 128").replace("seed = 0", "seed = 3"))
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("the recipe differs from the one step-00000002.pt was trained with "
                                     "(batch.global_batch 256 -> 128, train.seed 0 -> 3): put those values back "
                                     f"in {toml}, or start a new run with --out") in err
    assert not (out / "final.pt").exists()
    # where and how it runs may change: more checkpoints kept, another worker count
    toml.write_text(kept.replace("keep_checkpoints = 10", "keep_checkpoints = 3").replace("workers = 6", "workers = 0"))
    assert main(["train", "--resume", str(out)]) == 0
    final = checkpoint.load(out / "final.pt")
    assert final["recipe"]["name"] == "fashion-mnist-demo"  # not RUN/recipe.toml
    assert final["recipe"]["train"]["keep_checkpoints"] == 3


def test_a_resume_survives_a_metrics_line_cut_short_or_lost(tmp_path, capsys, fashion_dir):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "fashion-mnist-demo", "--out", str(out), *SMALL]) == 0
    whole = (out / "metrics.jsonl").read_text().splitlines()
    cut_short(out, 4)  # the end of epoch 2: its checkpoint holds its metrics
    (out / "metrics.jsonl").write_text(whole[0] + "\n" + whole[1][:40])  # the crash cut epoch 2's line
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 0
    assert "dropping the last line of" in capsys.readouterr().out
    assert [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    cut_short(out, 4)
    (out / "metrics.jsonl").write_text(whole[0] + "\n")  # the line never written
    assert main(["train", "--resume", str(out)]) == 0
    assert (out / "metrics.jsonl").read_text().splitlines() == whole
    (out / "metrics.jsonl").write_text("{oops\n" + whole[1] + "\n")
    cut_short(out, 4)
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 2
    assert f"{out / 'metrics.jsonl'}:1 is not a JSON line" in capsys.readouterr().err


def test_a_log_that_cannot_be_written_still_leaves_the_epochs_checkpoint(tmp_path, capsys, fashion_dir,
                                                                        monkeypatch):
    import builtins

    out = tmp_path / "run"
    real_open = builtins.open

    def full_disk(file, mode="r", *args, **kwargs):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk)
    assert main(["train", "--recipe", "fashion-mnist-demo", "--out", str(out), *SMALL]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not append epoch 1 to" in err and "No space left on device" in err
    assert "step-00000002.pt and holds this epoch's metrics" in err
    assert checkpoint.load(checkpoint.step_path(out / "checkpoints", 2))["metrics"]["epoch"] == 1
    monkeypatch.setattr(builtins, "open", real_open)
    assert main(["train", "--resume", str(out)]) == 0
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_an_old_checkpoint_that_cannot_be_deleted_is_a_warning(tmp_path, capsys, fashion_dir, monkeypatch):
    from pathlib import Path

    out = tmp_path / "run"
    real_unlink = Path.unlink

    def refuse(self, missing_ok=False):
        if self.name.startswith("step-"):
            raise PermissionError(13, "Permission denied")
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse)
    assert main(["train", "--recipe", "fashion-mnist-demo", "--out", str(out), *SMALL,
                 "--set", "train.keep_checkpoints=1"]) == 0
    printed = capsys.readouterr().out
    assert "could not delete the older checkpoint(s) step-00000001.pt (Permission denied)" in printed
    assert (out / "final.pt").exists()


def test_a_stop_asked_for_during_the_evaluation_trains_no_more(tmp_path, capsys, fashion_dir, monkeypatch):
    import megabatch.train as trainer
    from megabatch.errors import Preempted

    out = tmp_path / "run"
    real_evaluate, asked = trainer.evaluate, []

    def evaluate_then_signal(*args, **kwargs):
        asked.append(True)  # the signal handler's flag, set while the test set is evaluated
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", evaluate_then_signal)
    monkeypatch.setattr("megabatch.build.stop_on_signals", lambda: _flag(asked))
    assert main(["train", "--recipe", "fashion-mnist-demo", "--out", str(out), *SMALL]) == Preempted.exit_code
    assert "stopped by a signal after epoch 1, iteration 2" in capsys.readouterr().err
    assert [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")] == ["step-00000001.pt", "step-00000002.pt"]


class _flag:
    """A stand-in for stop_on_signals: the stop is requested once ``asked`` is not empty."""

    def __init__(self, asked: list) -> None:
        self.asked = asked

    def __enter__(self):
        return lambda: bool(self.asked)

    def __exit__(self, *exc) -> None:
        return None


def test_validation_images_are_held_out_of_training_and_evaluated(tmp_path, capsys, fashion_dir):
    """data.validation_images: the run trains on the rest (fewer steps per epoch), every
    evaluation reports val_top1 beside test_top1, and a study's result row carries it."""
    out = tmp_path / "run"
    assert main(["train", "--recipe", "fashion-mnist-demo", "--out", str(out), "--set", "data.train_subset=2048",
                 "--set", "data.validation_images=512", "--set", "data.test_subset=500",
                 "--set", "batch.global_batch=256", "--set", "train.epochs=2", "--set", "train.precision=fp32"]) == 0
    printed = capsys.readouterr().out
    assert "1536 training images (512 more held out for validation), 6 steps/epoch" in printed
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [6, 12]
    assert all(0.0 < m["val_top1"] <= 100.0 and m["val_loss"] > 0 for m in lines)
    assert lines[-1]["val_top1"] != lines[-1]["test_top1"]  # another set of images
    assert f"val top-1 {lines[-1]['val_top1']:.2f}%" in printed and "(validation top-1" in printed
    from megabatch.study.runner import summarize
    from megabatch.study.spec import Method, Run as Cell

    row = summarize(Cell(Method(name="demo", recipe="fashion-mnist-demo"), 256, 0), out, diverged=False, wall_time_s=1.0)
    assert row["final_val_top1"] == lines[-1]["val_top1"] and row["final_top1"] == lines[-1]["test_top1"]


def test_recomputed_bn_statistics_are_the_mean_over_workers_of_one_batch():
    from megabatch.data.images import ImageTensors
    from megabatch.nn import GhostBatchNorm2d

    torch.manual_seed(0)
    data = ImageTensors(torch.randint(0, 256, (40, 3, 5, 5), dtype=torch.uint8), torch.zeros(40, dtype=torch.long),
                        0.5, 0.25, ("a",))
    model = torch.nn.Sequential(GhostBatchNorm2d(3, group_size=4, momentum=0.1))
    plan = BatchPlan.create(16, 4, 8)  # 4 workers of 4 images, in 2 passes
    recompute_bn_statistics(model, data, plan, seed=3, augment=False, device=torch.device("cpu"))
    x, _ = data.batch(epoch_order(3, 0, 40)[:16])
    groups = x.view(4, 4, 3, 5, 5)
    mean = groups.mean(dim=(1, 3, 4)).mean(0)
    var = groups.var(dim=(1, 3, 4), unbiased=True).mean(0)
    bn = model[0]
    torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=0, atol=1e-6)
    assert bn.momentum == 0.1 and not bn.training  # the layer's own setting is kept; ready to evaluate


def test_a_copy_outside_git_reports_the_commit_it_was_given(monkeypatch):
    import subprocess

    from megabatch import provenance

    monkeypatch.delenv("MEGABATCH_GIT_COMMIT", raising=False)
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", provenance.git_commit())  # this copy, in git or not
    # Set, it wins: a copy shipped to another machine may carry an older .git.
    monkeypatch.setenv("MEGABATCH_GIT_COMMIT", "0123abcd")
    assert provenance.git_commit() == "0123abcd"

    def no_git(*args, **kwargs):
        raise subprocess.CalledProcessError(128, "git")  # "not a git repository"

    monkeypatch.setattr(provenance.subprocess, "run", no_git)
    monkeypatch.delenv("MEGABATCH_GIT_COMMIT")
    assert provenance.git_commit() == "unknown"
