"""Where a training run is assembled, started and resumed.

:func:`train` is ``megabatch train``: it joins the process group, decides between a
new run, ``--resume`` and a torchrun restart (:func:`open_run_dir`), builds the
:class:`~megabatch.run.Run` from the recipe (:func:`build_run`: model with per-worker
BN, optimizer, data, batch plan, compile, DDP), prints what the recipe resolves to
(:func:`describe`), and hands the run to the loop, :func:`megabatch.train.fit`.
Everything the recipe leaves to the device ("auto") is decided here, once.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from megabatch import checkpoint, distributed, metrics_log, models, provenance, schedules
from megabatch import recipe as recipes
from megabatch.batching import BatchPlan, max_micro_batch
from megabatch.data import hold_out, load_datasets
from megabatch.distributed import DistInfo, wrap_model
from megabatch.errors import UserError
from megabatch.nn import convert_to_ghost_bn, set_bn_mode
from megabatch.noise import NoiseScale
from megabatch.optim import LARS, RMSpropWarmup, param_groups
from megabatch.progress import Progress
from megabatch.recipe import Recipe, compile_label, to_toml
from megabatch.run import Run
from megabatch.signals import stop_on_signals

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- the device and what the recipe leaves to it ----------------------------------------

def resolve_device(name: str, dist: DistInfo = DistInfo()) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device = cuda but no CUDA device is visible: use --set train.device=cpu")
        return torch.device("cuda", dist.local_rank % torch.cuda.device_count())
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU with bf16 support, or a CPU
    with AVX512-BF16 or AMX (read from /proc/cpuinfo; elsewhere: no)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and provenance.cpu_native_bf16()


def resolve_recipe(recipe: Recipe, device: torch.device) -> Recipe:
    """A copy of ``recipe`` with its device-dependent "auto" values decided (precision)."""
    if recipe.train.precision != "auto":
        return recipe
    resolved = copy.deepcopy(recipe)
    resolved.train.precision = "bf16" if native_bf16(device) else "fp32"
    return resolved


def memory_format(setting: str = "auto") -> torch.memory_format:
    """``train.memory_format``; "auto" is channels-last everywhere: cuDNN's and oneDNN's
    convolutions prefer it, and ghost BN works on each group where it lies. Measured on
    2 CPU cores (Zen 3): the small CNN's step 1.47x, ResNet-50's 1.07x faster than
    contiguous; ``megabatch bench --model small-cnn`` prices it again on any machine."""
    if setting == "auto":
        setting = "channels_last"
    return torch.channels_last if setting == "channels_last" else torch.contiguous_format


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile's modes that replay CUDA graphs


def configure_backends(device: torch.device, recipe: Recipe) -> None:
    """The process-wide settings of the run's device, on CUDA: cuDNN autotuning, and TF32
    in fp32 convolutions and matmuls only where the recipe asks for it."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = recipe.train.cudnn_benchmark
        set_tf32(recipe.train.tf32)


@contextlib.contextmanager
def backends(device: torch.device, recipe: Recipe):
    """:func:`configure_backends` for a ``with`` block only: after it the process's flags are
    what they were (the bench sets a loop's flags, then hands the process back as it found it)."""
    with _tf32_setters():
        saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        configure_backends(device, recipe)
        yield
    finally:
        with _tf32_setters():
            (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32) = saved


def set_tf32(enabled: bool) -> None:
    """TF32 in CUDA's fp32 convolutions and matmuls, on or off. The flags of each backend
    (torch.set_float32_matmul_precision would reach the CPU too), by the API that keeps
    torch.get_float32_matmul_precision() readable, which Inductor's autotuning reads: the
    newer per-backend fp32_precision settings, mixed, make it raise."""
    with _tf32_setters():
        torch.backends.cudnn.allow_tf32 = enabled
        torch.backends.cuda.matmul.allow_tf32 = enabled


@contextlib.contextmanager
def _tf32_setters():
    """Silence the warning of torch 2.9 to 2.11 that the legacy TF32 flags will be deprecated:
    not for megabatch's users, who did not write them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Please use the new API settings to control TF32")
        yield


# --- the parts -----------------------------------------------------------------------------

def build_model(recipe: Recipe, in_channels: int, num_classes: int, device: torch.device) -> nn.Module:
    """The recipe's model with per-worker (ghost) batch norm and its BN statistics mode."""
    torch.manual_seed(recipe.train.seed)
    model = models.create(recipe.model.arch, num_classes, in_channels, recipe.model.zero_init_residual)
    convert_to_ghost_bn(model, recipe.batch.per_worker_batch)
    set_bn_mode(model, recipe.model.bn)
    return model.to(device=device, memory_format=memory_format(recipe.train.memory_format))


def build_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    o = recipe.optimizer
    # LARS's trust ratio is skipped where weight decay is (You et al.: BN and biases).
    groups = param_groups(model, o.weight_decay, o.no_decay_bn_bias,
                          {"lars_adaptation": False} if o.name == "lars" else None)
    # The trainer sets lr (and alpha_sgd) before every step; these are placeholders.
    if o.name == "lars":
        return LARS(groups, lr=recipe.base_lr, momentum=o.momentum, trust_coefficient=o.trust_coefficient,
                    trust_norm=o.trust_norm)
    if o.name == "rmsprop_warmup":
        return RMSpropWarmup(groups, lr=recipe.base_lr, momentum=o.momentum, rms_decay=o.rms_decay,
                             eps=o.eps, rmsprop_lr=o.rmsprop_lr, alpha_sgd=0.0)
    return torch.optim.SGD(groups, lr=recipe.base_lr, momentum=o.momentum)


def build_run(recipe: Recipe, data_dir: str | None, out_dir: Path, progress: Progress | None = None,
              dist: DistInfo = DistInfo(), state: dict[str, Any] | None = None) -> Run:
    """Load the data, build model and optimizer (from ``state``, a checkpoint, when
    resuming), compile, wrap in DDP, and write the run's provenance (rank 0)."""
    device = resolve_device(recipe.train.device, dist)
    recipe = resolve_recipe(recipe, device)
    if state is not None:
        recipe = same_recipe(recipe, state, out_dir)
    configure_backends(device, recipe)
    plan = BatchPlan.create(recipe.batch.global_batch, recipe.batch.per_worker_batch,
                            recipe.batch.micro_batch, dist.world_size, dist.rank,
                            max_micro_batch(device.type))
    train_data, test_data = load_datasets(recipe.data, data_dir, device.type)
    train_data, validation_data = hold_out(train_data, recipe.data.validation_images)
    model = build_model(recipe, train_data.channels, len(train_data.classes), device)
    steps = plan.steps_per_epoch(len(train_data))
    t = recipe.train
    run = Run(recipe, model, model, build_optimizer(recipe, model), train_data, test_data, plan, device, out_dir,
              progress or Progress(t.epochs, steps, enabled=dist.is_main),
              schedule=functools.partial(schedules.recipe_values, recipe, steps_per_epoch=steps), dist=dist,
              layout=memory_format(t.memory_format), autocast_dtype=AUTOCAST_DTYPES[t.precision],
              scaler=torch.amp.GradScaler(device.type) if t.precision == "fp16" else None,
              noise=NoiseScale() if t.noise_scale else None, validation_data=validation_data)
    if state is not None:
        run.load_state_dict(state)
        restore_history(run, state)
    # Compile, then wrap (torchtitan's order): DDP sees the compiled module, nothing
    # reaches into torch.compile's wrapper. DDP broadcasts rank 0's parameters: all
    # ranks start equal.
    run.net = wrap_model(torch.compile(model, mode=t.compile_mode) if t.compile else model, dist, t.comm_dtype)
    if t.compile and t.compile_mode in CUDA_GRAPH_MODES:
        # A CUDA graph's outputs live in its memory pool until its next replay: a backward's
        # gradients, taken over as .grad, would be overwritten by the next micro-batch's
        # forward before they are summed. Gradients that are the run's own tensors, added
        # into and zeroed, never are.
        run.keep_grads = True
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if state is None or not (out_dir / "recipe.toml").is_file():  # a resumed run's is its own already
            (out_dir / "recipe.toml").write_text(to_toml(recipe))
        info = {**provenance.collect(device), "workers": plan.workers, "processes": dist.world_size,
                "launcher": dist.launcher, "micro_batch": plan.micro_batch, "steps_per_epoch": steps,
                "base_lr": recipe.base_lr}
        if state is not None:
            info["resumed_from"] = state["path"]
            info["attempts"] = earlier_attempts(out_dir / "run.json")
        (out_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return run


def same_recipe(recipe: Recipe, state: dict[str, Any], out_dir: Path) -> Recipe:
    """The recipe a run continues with: ``recipe`` (its recipe.toml, or a torchrun restart's
    command), which must compute what the checkpoint's did, under the checkpoint's name."""
    trained = recipes.from_dict(state["recipe"])
    changed = recipes.changes(trained, recipe)
    if changed:
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise UserError(f"the recipe differs from the one {Path(state['path']).name} was trained with ({shown}): "
                        f"put those values back in {out_dir / 'recipe.toml'}, or start a new run with --out; "
                        f"a resumed run may change only {', '.join(sorted(recipes.RESUMABLE - {'name', 'description'}))}")
    recipe = copy.deepcopy(recipe)
    recipe.name = trained.name
    return recipe


def earlier_attempts(path: Path) -> list[dict[str, Any]]:
    """The provenance of every earlier attempt of a resumed run, oldest first, from its
    run.json: a run continued across sessions may span commits and machines."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [*previous.pop("attempts", []), previous]


# --- new run, --resume, or a torchrun restart -----------------------------------------------

def find_checkpoint(run_dir: Path, log: Callable[[str], Any] | None = None) -> dict[str, Any] | None:
    """The newest checkpoint of ``run_dir`` that loads; damaged ones are skipped (and said)."""
    for path in reversed(checkpoint.list_checkpoints(run_dir / "checkpoints")):
        try:
            state = checkpoint.load(path, require_finite=True, run_state=True)
        except UserError as e:
            if log:
                log(f"skipping {path.name}: {e}")
            continue
        state["path"] = str(path)
        return state
    return None


def chosen_checkpoint(run_dir: Path, dist: DistInfo) -> dict[str, Any] | None:
    """The checkpoint every process continues from: the one rank 0 finds newest (on a shared
    disk, another node's listing may lag), loaded by each; if any process cannot read it,
    all stop with the same one-line error."""
    state = find_checkpoint(run_dir, log=lambda m: print(m, file=sys.stderr)) if dist.is_main else None
    path = distributed.same_on_all_ranks(state["path"] if state else None, dist)
    failure = None
    if path is not None and state is None:
        try:
            state = checkpoint.load(path, require_finite=True, run_state=True)
            state["path"] = path
        except UserError as e:
            failure = f"rank {dist.rank}: {e}"
    failures = [f for f in distributed.gathered(failure, dist) if f]
    if failures:
        raise UserError(f"not every process can read the checkpoint rank 0 chose, {path}: {failures[0]}")
    return state


def restore_history(run: Run, state: dict[str, Any]) -> None:
    """Keep the metrics of the epochs the checkpoint holds (its own epoch's from the
    checkpoint, where metrics.jsonl lost it); rank 0 rewrites metrics.jsonl."""
    metrics = run.out_dir / "metrics.jsonl"
    lines = metrics_log.read(metrics, run.progress.info)
    run.history = [m for m in lines if m["epoch"] <= state["epoch"]]
    own = state.get("metrics") or {}
    if own.get("epoch") == state["epoch"] and (not run.history or run.history[-1]["epoch"] < state["epoch"]):
        run.history.append(own)
    if run.dist.is_main and (metrics.exists() or run.history):
        metrics_log.write(metrics, run.history)
    run.progress.info(f"resuming from {state['path']} (iteration {run.iteration}, "
                      f"{state['epoch']} epochs done)")


def load_recipe(recipe_name: str | None, overrides: list[str], resume: str | None,
                out: str | None) -> Recipe:
    """The recipe of a new run (a name or file, with ``--set`` overrides) or of the run
    that ``--resume RUN_DIR`` continues (its own recipe.toml)."""
    if resume:
        if recipe_name or overrides or out:
            raise UserError("--resume RUN_DIR continues that run with its own recipe.toml: "
                            "drop --recipe, --set and --out")
        if not (Path(resume) / "recipe.toml").is_file():
            raise UserError(f"{resume} is not a run directory (no recipe.toml)")
        return recipes.load(str(Path(resume) / "recipe.toml"))
    if not recipe_name:
        raise UserError("give --recipe NAME (a new run) or --resume RUN_DIR (continue one)")
    return recipes.load(recipe_name, overrides)


def open_run_dir(recipe: Recipe, resume: str | None, out: str | None,
                 dist: DistInfo) -> tuple[Path, dict[str, Any] | None]:
    """(run directory, checkpoint to continue from or None): a new run, ``--resume
    RUN_DIR``, or the same command started again by torchrun (``--max-restarts``),
    which continues instead of starting over."""
    if resume:
        run_dir = Path(resume)
    else:
        stem = Path(recipe.name).stem if recipe.name.endswith(".toml") else recipe.name
        run_dir = Path(out) if out else Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = distributed.same_on_all_ranks(run_dir, dist)  # rank 0's default name, should clocks differ
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if not (resume or restarted):
        if (run_dir / "metrics.jsonl").exists():
            raise UserError(f"{run_dir} already holds a run: choose another --out folder, or continue it "
                            f"with --resume {run_dir}")
        return run_dir, None
    state = chosen_checkpoint(run_dir, dist)
    if state is None and resume:
        raise UserError(f"{run_dir} holds no complete checkpoint to resume from")
    if state is None and dist.is_main:  # restarted before the first checkpoint: start over
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    return run_dir, state


def tensorboard_logger(run_dir: Path) -> tuple[Callable[[dict[str, Any], int], None], Callable[[], None]]:
    """(log, close): ``log(metrics, step)`` writes every number of ``metrics`` as a scalar
    to TensorBoard event files under ``run_dir/tensorboard``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.tensorboard = true needs the package tensorboard: "
                        "pip install 'megabatch[tensorboard]' (or set train.tensorboard=false)") from None
    writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(metrics: dict[str, Any], step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "iteration"):
                writer.add_scalar(key, value, step)

    return log, writer.close


def train(recipe_name: str | None, overrides: list[str], resume: str | None, out: str | None,
          data_dir: str | None) -> dict[str, Any]:
    """``megabatch train``: open or continue the run, build it, describe it, fit it."""
    from megabatch.train import fit  # the loop, beneath this module

    recipe = load_recipe(recipe_name, overrides, resume, out)
    info = distributed.setup(recipe.train.device)
    close = None
    try:
        run_dir, state = open_run_dir(recipe, resume, out, info)
        with stop_on_signals() as stop_requested:
            run = build_run(recipe, data_dir, run_dir, dist=info, state=state)
            run.stop_requested = stop_requested
            if run.recipe.train.tensorboard and info.is_main:
                run.log, close = tensorboard_logger(run_dir)
            run.progress.info(describe(run))
            result = fit(run)
    except BaseException:
        distributed.teardown(info, clean=False)
        raise
    finally:
        if close:
            close()
    distributed.teardown(info)
    return result


def describe(run: Run) -> str:
    """The derived values of the recipe, printed at start."""
    r, p = run.recipe, run.plan
    steps = run.steps_per_epoch
    e = schedules.epoch_settings(r, steps)
    if r.schedule.kind == "polynomial":
        shape = f"polynomial decay (power {r.schedule.power:g}) to epoch {r.train.epochs}"
    else:
        shape = f"factors {r.schedule.factors} at epochs {[round(b, 3) for b in e.boundaries]}"
    if e.scale != 1.0:
        shape += (f" (written in steps, {steps} per epoch)" if r.schedule.unit == "step" else
                  f" (written for {r.schedule.reference_epochs:g} epochs, stretched x{e.scale:.3g})")
    lines = [
        f"recipe {r.name}: {r.description}",
        f"  global batch {p.global_batch} = {_count(p.workers, 'worker')} x {p.per_worker_batch} images; "
        f"{_count(p.processes, 'process')} x {_count(p.workers // p.processes, 'emulated worker')}; "
        f"micro-batch {p.micro_batch} ({_count(p.micro_batches, 'pass')} per step)",
        f"  lr = {r.optimizer.lr_per_256:g} per 256 x {p.global_batch}/256 = {r.base_lr:g}; {shape}"
        + (f"; warm-up {e.warmup_epochs:.3g} epochs from {r.optimizer.lr_per_256:g}" if e.warmup_epochs else ""),
    ]
    if r.optimizer.name == "rmsprop_warmup":
        lines.append(f"  RMSprop warm-up: rmsprop_lr {r.optimizer.rmsprop_lr:g}, alpha_sgd center "
                     f"{e.alpha_center:.3g} period {e.alpha_period:.3g} epochs")
    compiled = compile_label(r.train.compile, r.train.compile_mode)
    lines.append(f"  optimizer {r.optimizer.name}, momentum {r.optimizer.momentum:g}, weight decay "
                 f"{r.optimizer.weight_decay:g}{' (not on BN/bias)' if r.optimizer.no_decay_bn_bias else ''}; "
                 f"bn {r.model.bn}; model {r.model.arch}; {r.train.precision} compute, "
                 f"{'channels-last' if run.layout == torch.channels_last else 'contiguous'}"
                 f"{', ' + compiled if compiled else ''}; gradients all-reduced in {r.train.comm_dtype}")
    held = (f" ({len(run.validation_data)} more held out for validation)"
            if run.validation_data is not None else "")
    lines.append(f"  {len(run.train_data)} training images{held}, {steps} steps/epoch, {r.train.epochs} epochs "
                 f"= {run.total_steps} steps; device {provenance.device_name(run.device)}"
                 + (f": {provenance.cpu_summary()}" if run.device.type == "cpu" else ""))
    if run.noise:
        lines.append(f"  gradient noise scale: from {p.micro_batches * p.processes} micro-batches of "
                     f"{p.micro_batch} images per step" if p.micro_batches > 1 else "  gradient noise scale: NOT measured: a step has a single micro-batch "
                     "per process (set batch.micro_batch to a part of the process's share of the batch)")
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith(("s", "ss")) else "s")
