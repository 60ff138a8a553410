"""The two train steps that ``megabatch bench`` times on ResNet-50, at one setting
(:class:`Config`: precision, memory format, compile): megabatch's own
:func:`~megabatch.train.train_step` on a Run built from the paper's recipe (emulated
workers, ghost BN, RMSprop warm-up, fp16 gradient rounding), and a plain PyTorch loop at
the same setting. torch is imported inside the functions."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from megabatch.bench import profiling
from megabatch.bench.timing import measure, released
from megabatch.recipe import compile_label

if TYPE_CHECKING:
    from megabatch.bench.settings import Settings

RECIPE = "paper-resnet50-imagenet-32k"


@dataclass(frozen=True)
class Config:
    precision: str
    memory_format: str
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's, with compile

    @property
    def name(self) -> str:
        return f"megabatch {self.precision} {self.memory_format} {self.compiled}"

    @property
    def compiled(self) -> str:
        return compile_label(self.compile, self.compile_mode) or "eager"



def megabatch_run(s: Settings, config: Config, per_worker: int, out: Path, jpegs: tuple | None = None):
    """A Run of the paper's recipe at this batch, on synthetic images (moved to the device
    beforehand) or, with ``jpegs`` = (folder, decoder, workers), on a JPEG folder."""
    from megabatch import recipe as recipes
    from megabatch.bench import inputs
    from megabatch.data.images import ImageTensors
    from megabatch.progress import Progress
    from megabatch.build import build_run
    from megabatch.schedules import recipe_values
    from megabatch.train import set_hyperparameters

    b = s.batch
    values = {"batch.global_batch": b, "batch.micro_batch": b, "batch.per_worker_batch": per_worker,
              "train.precision": config.precision, "train.memory_format": config.memory_format,
              "train.compile": config.compile, "train.compile_mode": config.compile_mode if config.compile else "default",
              "train.device": s.device.split(":")[0]}
    if jpegs is None:
        values.update({"data.dataset": "synthetic", "data.synthetic_size": [2 * b, b, s.image_size, 3, 1000]})
    else:
        values.update({"data.image_size": s.image_size, "data.resize_size": inputs.resize_size(s.image_size),
                       "data.decoder": jpegs[1], "data.workers": jpegs[2]})
    recipe = recipes.load(RECIPE, values=values)
    run = build_run(recipe, str(jpegs[0]) if jpegs else None, out, Progress(1, 1, enabled=False))
    d = run.train_data
    if jpegs is None:  # time the step, not host-to-device copies
        run.train_data = ImageTensors(d.images.to(run.device), d.labels.to(run.device), d.mean, d.std, d.classes)
    else:  # one epoch lasts the whole measurement: the loader's workers start once
        run.train_data = inputs.repeated(d, b * (s.warmup + 2 + s.repeats * s.steps))
    set_hyperparameters(run.optimizer, *recipe_values(recipe, 0.0, run.steps_per_epoch))
    return run


@released
def time_megabatch(s: Settings, config: Config, per_worker: int, out: Path, jpegs: tuple | None = None,
                   profile: bool = False) -> dict:
    """The real megabatch step, timed: ``train_step`` on the Run's own micro-batches
    (and, with ``profile``, profiled for a few more steps)."""
    from megabatch.bench import inputs
    from megabatch.train import train_step

    run = megabatch_run(s, config, per_worker, out, jpegs)
    feed = inputs.steps(run.train_data, run.plan, run.device, run.recipe.data.augment, run.recipe.train.seed)
    losses = []

    def step() -> None:
        losses.append(train_step(run, next(feed)).loss)

    # Compilation happens in the first calls: never timed.
    with graphs_skipped(config) as skips:
        result = measure(step, s, s.batch, max(s.warmup, 2) if config.compile else None)
    result.update(skips)
    if profile:
        result["profile"] = profiling.profile_steps(step, s.device)
    feed.close()
    bad = sum(not loss == loss or abs(loss) == float("inf") for loss in losses)
    if bad:
        result["non_finite_losses"] = bad
        print(f"warning: {config.name}: {bad} non-finite losses (those steps skip the optimizer)", file=sys.stderr)
    return result


@contextlib.contextmanager
def graphs_skipped(config: Config) -> Iterator[dict]:
    """Under a CUDA-graph compile mode, the dict gets ``cudagraph_skips``: how many compiled
    graphs Inductor ran without CUDA graphs in the block (a CPU, an unsupported op or
    input mutation; ``TORCH_LOGS=cudagraphs`` says why). A mode that silently falls back
    would otherwise pass for one that does not help."""
    from megabatch.build import CUDA_GRAPH_MODES

    try:  # Inductor's own counter: no public API counts the fallbacks
        from torch._dynamo.utils import counters
    except ImportError:  # a torch that moved it: the result says nothing rather than fail
        yield {}
        return
    found: dict = {}
    before = counters["inductor"]["cudagraph_skips"]
    yield found
    if config.compile and config.compile_mode in CUDA_GRAPH_MODES:
        found["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - before


def plain_name(config: Config) -> str:
    return f"plain PyTorch {config.precision} {config.memory_format} {config.compiled}"


@released
def time_plain(s: Settings, config: Config, profile: bool = False) -> dict:
    """A user's own loop at ``config``'s precision, memory format and compile setting:
    torchvision ResNet-50, nn.BatchNorm2d over the whole batch, momentum SGD (PyTorch's
    default foreach path), autocast and, in fp16, a GradScaler; cuDNN autotuning and TF32
    (the recipe's ``train.tf32``: off) as in megabatch's runs. It is fed as megabatch's
    step is: a new batch of the same synthetic images each step, augmented as the recipe
    says, and one host sync per step (megabatch's agreement on the loss). Nothing of
    megabatch's emulation: the ratio prices it alone."""
    import torch
    import torch.nn.functional as F
    import torchvision

    from megabatch import recipe as recipes
    from megabatch.batching import BatchPlan
    from megabatch.bench import inputs
    from megabatch.build import AUTOCAST_DTYPES, backends, memory_format
    from megabatch.data import synthetic
    from megabatch.data.images import ImageTensors

    torch.manual_seed(0)
    layout = memory_format(config.memory_format)
    model = torchvision.models.resnet50().to(s.device, memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1 * s.batch / 256, momentum=0.9)
    net = torch.compile(model, mode=config.compile_mode) if config.compile else model
    dtype = AUTOCAST_DTYPES[config.precision]
    device_type = torch.device(s.device).type
    scaler = torch.amp.GradScaler(device_type) if config.precision == "fp16" else None
    recipe = recipes.load(RECIPE)
    made, _ = synthetic.make(s.batch, 1, s.image_size, 3, 1000)
    train = ImageTensors(made.images.to(s.device), made.labels.to(s.device), made.mean, made.std, made.classes)
    feed = inputs.steps(train, BatchPlan.create(s.batch, s.batch, s.batch), torch.device(s.device),
                        recipe.data.augment, recipe.train.seed)

    def step() -> None:
        [(x, y)] = list(next(feed))
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(net(x.contiguous(memory_format=layout)), y)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad()
        loss.item()  # one host sync per step, as megabatch's

    with backends(torch.device(s.device), recipe):  # as in megabatch's runs
        with graphs_skipped(config) as skips:
            result = measure(step, s, s.batch, max(s.warmup, 2) if config.compile else None)
        result.update(skips)
        if profile:
            result["profile"] = profiling.profile_steps(step, s.device)
    return result
