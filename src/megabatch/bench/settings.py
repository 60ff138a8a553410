"""What one ``megabatch bench`` run of ResNet-50 measures, as :class:`Settings`: the
flags checked (one-line errors), with the defaults of the device filled in (224 px and
batch 256 on a GPU, 64 px and batch 32 on a CPU)."""

from __future__ import annotations

import argparse
import typing
from dataclasses import dataclass

from megabatch.bench.flags import at_least, wants_gpu
from megabatch.recipe import CompileMode
from megabatch.errors import UserError

GHOST_GROUP = 32  # the paper's images per worker
COMPILE_MODES = typing.get_args(CompileMode)  # torch.compile's, as a recipe's train.compile_mode


@dataclass(frozen=True)
class Settings:
    device: str  # "cuda:0" or "cpu"
    image_size: int
    batch: int
    steps: int
    warmup: int
    repeats: int
    per_worker_batch: int  # images per emulated worker (ghost-BN group) in the megabatch steps
    precisions: tuple[str, ...]
    memory_formats: tuple[str, ...]
    compile: bool
    profile: bool
    quick: bool
    note: str
    compile_mode: str = "default"  # torch.compile's, for both steps


def settings(args: argparse.Namespace) -> Settings:
    """The flags checked, with the defaults of the device filled in."""
    import torch

    gpu = wants_gpu(args.device)

    def pick(value: int | None, flag: str, quick: int, on_gpu: int, on_cpu: int, least: int = 1) -> int:
        return at_least(value if value is not None else quick if args.quick else on_gpu if gpu else on_cpu,
                        flag, least)

    size = pick(args.image_size, "image-size", 32, 224, 64, least=32)  # ResNet-50 halves it 5 times
    batch = pick(args.batch, "batch", 8, 256, 32, least=4)
    steps, repeats = pick(args.steps, "steps", 1, 20, 5), pick(args.repeats, "repeats", 1, 5, 3)
    warmup = pick(args.warmup, "warmup", 0, 3, 1, least=0)
    group = min(GHOST_GROUP, batch // 2)  # at least two workers, so that ghost BN is really on
    while batch % group:
        group -= 1
    if group < 2:
        raise UserError(f"--batch {batch} does not split into emulated workers of 2 or more images: "
                        f"give an even batch")
    if gpu:
        note = "" if (size, batch) == (224, 256) else f"GPU at image size {size} and batch {batch} (not 224 and 256)"
    else:
        note = (f"no GPU{' used (--device cpu)' if torch.cuda.is_available() else ''}: measured on the CPU at "
                f"image size {size} and batch {batch} (224 and 256 on a GPU); not comparable with GPU results")
    if args.quick:
        note += "; --quick: a tiny run for tests, not a measurement"
    precisions = choices(args.precisions, "precisions", ("fp32", "bf16", "fp16"),
                         ("fp32",) if args.quick else ("fp32", "bf16", "fp16") if gpu else ("fp32", "bf16"))
    formats = choices(args.memory_formats, "memory-formats", ("contiguous", "channels_last"),
                      ("contiguous",) if args.quick else ("contiguous", "channels_last"))
    compile = args.compile if args.compile is not None else gpu and not args.quick
    mode = getattr(args, "compile_mode", None)
    if mode is not None and mode not in COMPILE_MODES:
        raise UserError(f"--compile-mode {mode}: give one of {', '.join(COMPILE_MODES)}")
    if mode is not None and not compile:
        raise UserError(f"--compile-mode {mode} measures a compiled step: add --compile")
    return Settings(
        device="cuda:0" if gpu else "cpu", image_size=size, batch=batch, steps=steps, warmup=warmup,
        repeats=repeats, per_worker_batch=group, precisions=precisions, memory_formats=formats,
        compile=compile,
        profile=args.profile if args.profile is not None else gpu and not args.quick,
        quick=args.quick, note=note.lstrip("; "), compile_mode=mode or "default")


def choices(value: str | None, flag: str, allowed: tuple[str, ...], default: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated ``--flag`` list checked against ``allowed`` (``default`` when not given)."""
    if value is None:
        return default
    picked = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    bad = [v for v in picked if v not in allowed]
    if bad or not picked:
        raise UserError(f"--{flag} {value!r}: give a comma-separated list of {', '.join(allowed)}")
    return picked
