"""``megabatch bench --model small-cnn``: the demo recipe's training step, priced.

One process measures, on synthetic 28x28x1 images already on the device, with the demo
recipe's model and batch (global batch 2,048 in groups of 32 images per worker, the
automatic micro-batch: 256 on a CPU, 1,024 on a GPU):

* megabatch's own :func:`~megabatch.train.train_step` on a Run that
  :func:`~megabatch.build.build_run` builds from the demo recipe (ghost BN over groups of
  32, last-batch BN statistics, RMSprop warm-up, fp16 gradient rounding), in fp32 and bf16;
* beside a plain PyTorch loop of the same model (``nn.BatchNorm2d``, momentum SGD, the
  same global batch accumulated over the same micro-batches, the same precision): the
  ratio prices megabatch's emulation alone;
* ghost BN against plain BN: the same megabatch step with one group per micro-batch;
* the cost of ``train.noise_scale=true``: the same megabatch step with it on;
* the memory format: the same megabatch step in contiguous (NCHW) layout against the
  default channels-last, which prices ``train.memory_format = "auto"``'s choice.

The configurations are timed round-robin (:func:`megabatch.bench.timing.interleaved`),
so a busy machine slows both sides of each ratio alike. bf16 is measured everywhere, but
where the device has no native bf16 (:func:`megabatch.build.native_bf16`) it is emulated,
several times slower, and marked so; the BN and noise-scale comparisons are made at each
precision the device computes natively. torch is imported inside the functions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from megabatch.bench.flags import at_least, wants_gpu
from megabatch.bench.report import SMALL_COLUMNS, SMALL_WIDTH, output_path, ratio_line, row
from megabatch.bench.timing import compare, interleaved, warm_up
from megabatch.errors import UserError

RECIPE = "fashion-mnist-demo"
MODEL = "small-cnn"
REPEAT_SECONDS = 3.0  # without --steps: steps per timed repeat sized to last about this long
REPEATS = 9
GHOST_TARGET = 0.95  # issue 10: ghost BN at >= 0.95x plain BN's images/s
NOISE_TARGET = 0.05  # issue 14: train.noise_scale=true costs <= 5% of the step
RESNET_ONLY = ("image_size", "data", "compile", "compile_mode")


@dataclass(frozen=True)
class Settings:
    device: str  # "cuda:0" or "cpu"
    global_batch: int
    per_worker_batch: int  # the demo recipe's: the ghost-BN groups
    micro_batch: int  # what the recipe's automatic micro-batch is on this device (64 with --quick)
    steps: int | None  # per timed repeat; None: sized by the warm-up to REPEAT_SECONDS per precision
    warmup: int
    repeats: int
    precisions: tuple[str, ...]
    native_bf16: bool
    quick: bool
    note: str


@dataclass(frozen=True)
class Config:
    """One measured step: the plain PyTorch loop, or megabatch's with its BN groups and
    the noise-scale measurement on or off."""

    loop: str  # "plain" or "megabatch"
    precision: str
    plain_bn: bool = False  # megabatch: one BN group per micro-batch instead of one per worker
    noise_scale: bool = False
    contiguous: bool = False  # megabatch: NCHW instead of the default channels-last

    def name(self, group: int, micro: int, native_bf16: bool) -> str:
        if self.loop == "plain":
            name = f"plain PyTorch {self.precision}: nn.BatchNorm2d, SGD"
        elif self.plain_bn:
            name = f"megabatch {self.precision}, plain BN (one group of {micro})"
        elif self.noise_scale:
            name = f"megabatch {self.precision}, train.noise_scale=true"
        elif self.contiguous:
            name = f"megabatch {self.precision}, contiguous (NCHW) layout"
        else:
            name = f"megabatch {self.precision}: ghost BN {group}, RMSpropWarmup, fp16 grads"
        return name.replace("bf16", "bf16 (emulated)") if self.precision == "bf16" and not native_bf16 else name


def settings(args: argparse.Namespace) -> Settings:
    """The flags checked, with the defaults of the device filled in."""
    import torch

    from megabatch import recipe as recipes
    from megabatch.batching import BatchPlan, max_micro_batch
    from megabatch.build import native_bf16

    for flag in RESNET_ONLY:
        if getattr(args, flag) is not None:
            raise UserError(f"--{flag.replace('_', '-')} is for --model resnet50; the small CNN trains on "
                            f"28x28 synthetic images in eager mode")
    gpu = wants_gpu(args.device)

    def pick(value: int | None, flag: str, quick: int, default: int, least: int = 1) -> int:
        return at_least(value if value is not None else quick if args.quick else default, flag, least)

    demo = recipes.load(RECIPE).batch
    batch = pick(args.batch, "batch", 128, demo.global_batch, least=2)
    steps = None if args.steps is None and not args.quick else pick(args.steps, "steps", 1, 1)
    warmup = pick(args.warmup, "warmup", 0, 3 if gpu else 2, least=0)
    if steps is None and warmup == 0:
        raise UserError("--warmup 0 needs --steps N: without it, the steps per repeat are sized by the warm-up")
    repeats = pick(args.repeats, "repeats", 2, REPEATS)
    micro = 64 if args.quick else 0
    plan = BatchPlan.create(batch, demo.per_worker_batch, micro,
                            max_micro_batch=max_micro_batch("cuda" if gpu else "cpu"))
    if plan.micro_batches < 2:
        raise UserError(f"--batch {batch} is a single micro-batch of {plan.micro_batch} here: the noise scale "
                        f"needs two or more; give a larger --batch (the demo's is {demo.global_batch})")
    device = torch.device("cuda:0" if gpu else "cpu")
    native = native_bf16(device)
    note = "" if gpu else "no GPU: measured on the CPU"
    if not native:
        note += ("; no native bf16 here: bf16 is emulated, several times slower than fp32 (unlike on a CPU with "
                 "AVX512-BF16 or AMX, or a GPU)")
    if args.quick:
        note += "; --quick: a tiny run for tests, not a measurement"
    return Settings(device=str(device), global_batch=batch, per_worker_batch=demo.per_worker_batch,
                    micro_batch=plan.micro_batch, steps=steps,
                    warmup=warmup, repeats=repeats,
                    precisions=("fp32", "bf16") if native or not gpu else ("fp32",),
                    native_bf16=native, quick=args.quick, note=note.lstrip("; "))


def configs(s: Settings) -> list[Config]:
    """The plain loop and megabatch's step at every precision; ghost against plain BN, the
    noise scale on and off and the two memory formats at each precision the device computes
    natively."""
    out = []
    for precision in s.precisions:
        out += [Config("plain", precision), Config("megabatch", precision)]
        if precision == "fp32" or s.native_bf16:
            out += [Config("megabatch", precision, plain_bn=True), Config("megabatch", precision, noise_scale=True),
                    Config("megabatch", precision, contiguous=True)]
    return out


def megabatch_step(s: Settings, c: Config, out: Path) -> tuple[Callable[[], None], list[float], Any]:
    """(step, its losses, the Run): ``train_step`` on a Run of the demo recipe, fed the
    Run's own micro-batches of synthetic images held on the device."""
    from megabatch import recipe as recipes
    from megabatch.bench import inputs
    from megabatch.build import build_run
    from megabatch.data.images import ImageTensors
    from megabatch.progress import Progress
    from megabatch.train import set_hyperparameters, train_step

    values = {"batch.global_batch": s.global_batch, "batch.micro_batch": s.micro_batch,
              "batch.per_worker_batch": s.micro_batch if c.plain_bn else s.per_worker_batch, "train.precision": c.precision,
              "train.noise_scale": c.noise_scale, "train.device": s.device.split(":")[0],
              "train.memory_format": "contiguous" if c.contiguous else "channels_last",
              "data.dataset": "synthetic", "data.synthetic_size": [s.global_batch, 1, 28, 1, 10]}
    run = build_run(recipes.load(RECIPE, values=values), None, out, Progress(1, 1, enabled=False))
    d = run.train_data
    run.train_data = ImageTensors(d.images.to(run.device), d.labels.to(run.device), d.mean, d.std, d.classes)
    set_hyperparameters(run.optimizer, *run.schedule(0.0))
    feed = inputs.steps(run.train_data, run.plan, run.device, run.recipe.data.augment, run.recipe.train.seed)
    losses: list[float] = []
    return lambda: losses.append(train_step(run, next(feed)).loss), losses, run


def plain_step(precision: str, run) -> tuple[Callable[[], None], list[float]]:
    """(step, its losses): a user's own loop of the same model, data, micro-batches, memory
    format and weight decay: ``nn.BatchNorm2d``, momentum SGD, gradients accumulated."""
    import torch
    import torch.nn.functional as F

    from megabatch import models
    from megabatch.bench import inputs
    from megabatch.build import AUTOCAST_DTYPES

    torch.manual_seed(0)
    model = models.create(MODEL, 10, 1).to(run.device, memory_format=run.layout)
    r = run.recipe
    optimizer = torch.optim.SGD(model.parameters(), lr=r.base_lr, momentum=0.9, weight_decay=r.optimizer.weight_decay)
    feed = inputs.steps(run.train_data, run.plan, run.device, r.data.augment, r.train.seed)
    dtype, passes = AUTOCAST_DTYPES[precision], run.plan.micro_batches
    losses: list[float] = []

    def step() -> None:
        total = torch.zeros((), device=run.device)
        for x, y in next(feed):
            with torch.autocast(run.device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(x.contiguous(memory_format=run.layout)), y) / passes
            loss.backward()
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total.item())  # the loss a loop logs: one sync per step, as megabatch's

    return step, losses


def run(args: argparse.Namespace) -> int:
    """Measure, print the table, write the JSON result; 0 on success."""
    import torch

    from megabatch import provenance
    from megabatch.nn import ghost_bn_implementation

    s = settings(args)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --out {out}: {err.strerror}") from None
    device = torch.device(s.device)
    device_name = provenance.device_name(device)
    load_before = os.getloadavg()
    cs = configs(s)
    names = {c: c.name(s.per_worker_batch, s.micro_batch, s.native_bf16) for c in cs}
    print(f"megabatch bench on {device_name}: {MODEL} ({RECIPE}), 28x28x1 synthetic images on the device, "
          f"global batch {s.global_batch} = {s.global_batch // s.per_worker_batch} emulated workers x "
          f"{s.per_worker_batch}, "
          f"{s.global_batch // s.micro_batch} micro-batches of {s.micro_batch}")
    if s.note:
        print(f"note: {s.note}")
    ghost_bn = ghost_bn_implementation(device)
    print(f"ghost BN: {ghost_bn}")
    print(f"{len(cs)} configurations timed round-robin (every other round reversed): {s.repeats} repeat(s) of "
          f"{s.steps or f'about {REPEAT_SECONDS:g} s of'} step(s) each, after {s.warmup} warm-up step(s); "
          f"median images/s and min-max; load average {load_before[0]:.2f}")
    timed, losses, counts, plain_loop = measure_all(s, cs)
    load_after = os.getloadavg()
    ratios = comparisons(s, timed)

    print(f"\n{SMALL_COLUMNS}")
    entries = []
    for c in cs:
        m, plain = timed[c], timed[Config("plain", c.precision)]
        print(row(names[c], m, plain["images_per_s"], width=SMALL_WIDTH))
        bad = sum(not loss == loss or abs(loss) == float("inf") for loss in losses[c])
        if bad:
            print(f"warning: {names[c]}: {bad} non-finite losses (megabatch skips their optimizer step)",
                  file=sys.stderr)
        entries.append({"name": names[c], **asdict(c), "images_per_s": m["images_per_s"], "spread": m["spread"],
                        "batch_size": s.global_batch, "micro_batch": s.micro_batch, "steps_per_repeat": counts[c],
                        "per_worker_batch": None if c.loop == "plain" else s.micro_batch if c.plain_bn
                        else s.per_worker_batch,
                        "ratio_to_plain": m["images_per_s"] / plain["images_per_s"],
                        **({"native_bf16": s.native_bf16} if c.precision == "bf16" else {}),
                        **({"non_finite_losses": bad} if bad else {}), "per_repeat": m["per_repeat"]})
    print("\nratios of median images/s in this run (range: the ratio within each repeat)")
    for kind, label in (("megabatch_vs_plain", "megabatch / plain PyTorch"), ("ghost_bn", "ghost BN / plain BN"),
                        ("noise_scale", "noise_scale on / off"), ("memory_format", "channels-last / contiguous")):
        for precision, r in ratios[kind].items():
            print(ratio_line(f"{label}, {precision}{'' if r.get('native_bf16', True) else ' (emulated)'}", r))
    print(f"load average (1 min): {load_before[0]:.2f} at the start, {load_after[0]:.2f} at the end")

    result = {
        "device": device_name, **provenance.collect(device), "model": MODEL, "note": s.note,
        "flags": {k: v for k, v in vars(args).items() if not callable(v)},  # as parsed, whoever called
        "settings": {**asdict(s), "repeat_seconds": None if s.steps else REPEAT_SECONDS, "recipe": RECIPE,
                     "model": MODEL, "image": [1, 28, 28], "data": "synthetic, on the device",
                     "micro_batches": s.global_batch // s.micro_batch, "ghost_bn": ghost_bn,
                     "threads": torch.get_num_threads(),
                     "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "plain_loop": plain_loop,
                     "order": "configurations timed round-robin, one repeat of each in turn, every other round "
                              "in reverse order", "load_average_1min": [load_before[0], load_after[0]]},
        "train_step": entries, **ratios,
    }
    path = output_path(out, device_name, MODEL)
    try:
        path.write_text(json.dumps(result, indent=2) + "\n")
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror}") from None
    print(f"\nwrote {path}")
    return 0


def measure_all(s: Settings, cs: list[Config]) -> tuple[dict, dict, dict, dict]:
    """(images/s, losses and steps per repeat of each configuration, the plain loop's settings):
    every step built, warmed up, then timed round-robin."""
    with tempfile.TemporaryDirectory(prefix="megabatch-bench-") as tmp:
        steps: dict[Config, Callable[[], None]] = {}
        losses: dict[Config, list[float]] = {}
        runs = {}
        for i, c in enumerate(c for c in cs if c.loop == "megabatch"):
            steps[c], losses[c], runs[c] = megabatch_step(s, c, Path(tmp) / str(i))
        for c in cs:
            if c.loop == "plain":
                steps[c], losses[c] = plain_step(c.precision, runs[Config("megabatch", c.precision)])
        r = runs[Config("megabatch", "fp32")].recipe
        plain_loop = {"bn": "nn.BatchNorm2d (momentum 0.1)", "optimizer": "torch.optim.SGD", "momentum": 0.9,
                      "lr": r.base_lr, "weight_decay": r.optimizer.weight_decay,
                      "loss": "mean over each micro-batch / micro-batches per step"}
        counts = step_counts(s, cs, warm_up(steps, s.device, s.warmup))
        print("steps per repeat: " + ", ".join(f"{p} {counts[Config('plain', p)]}" for p in s.precisions), flush=True)
        timed = interleaved({c: steps[c] for c in cs}, counts, s.device, s.global_batch, s.repeats,
                            lambda r: print(f"  repeat {r + 1}/{s.repeats} done", flush=True))
    return timed, losses, counts, plain_loop


def step_counts(s: Settings, cs: list[Config], seconds: dict[Config, float]) -> dict[Config, int]:
    """Steps per timed repeat: ``--steps``, or enough for the slowest configuration of each
    precision to last about REPEAT_SECONDS (its last warm-up step's time): the two sides of
    every comparison run the same steps."""
    if s.steps:
        return {c: s.steps for c in cs}
    slowest = {p: max(seconds[c] for c in cs if c.precision == p) for p in s.precisions}
    return {c: max(1, round(REPEAT_SECONDS / slowest[c.precision])) for c in cs}


def comparisons(s: Settings, timed: dict[Config, dict]) -> dict[str, dict[str, dict]]:
    """megabatch against the plain loop, ghost against plain BN and the noise scale on
    against off, per precision, each side by side in the same run."""
    out: dict[str, dict[str, dict]] = {"megabatch_vs_plain": {}, "ghost_bn": {}, "noise_scale": {},
                                       "memory_format": {}}
    for p in s.precisions:
        native = {"native_bf16": s.native_bf16} if p == "bf16" else {}
        step = timed[Config("megabatch", p)]
        out["megabatch_vs_plain"][p] = {**compare(step, timed[Config("plain", p)]), **native,
                                        "ratio_is": "images/s of megabatch's step / of the plain PyTorch loop"}
        if Config("megabatch", p, plain_bn=True) not in timed:
            continue
        ghost = compare(step, timed[Config("megabatch", p, plain_bn=True)])
        out["ghost_bn"][p] = {**ghost, **native, "group": s.per_worker_batch, "plain_group": s.micro_batch,
                              "ratio_is": "images/s with ghost BN (one group per worker) / with one group per "
                                          "micro-batch",
                              "target": GHOST_TARGET, "meets_target": ghost["ratio"] >= GHOST_TARGET}
        noise = compare(timed[Config("megabatch", p, noise_scale=True)], step)
        overhead = 1 / noise["ratio"] - 1
        out["noise_scale"][p] = {**noise, **native, "overhead": overhead,
                                 "ratio_is": "images/s with train.noise_scale=true / without",
                                 "overhead_is": "extra time per step with train.noise_scale=true (1/ratio - 1)",
                                 "target": NOISE_TARGET, "meets_target": overhead <= NOISE_TARGET}
        out["memory_format"][p] = {**compare(step, timed[Config("megabatch", p, contiguous=True)]), **native,
                                   "ratio_is": "images/s in channels-last (the default) / in contiguous NCHW"}
    return out
