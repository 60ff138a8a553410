"""``megabatch bench``: what training does on this machine, in images/s.

``--model small-cnn`` measures the demo recipe's step against a plain PyTorch loop
(:mod:`megabatch.bench_small`). For ResNet-50 (the default), one process measures:

* the train step: megabatch's own :func:`~megabatch.train.train_step` on a Run that
  :func:`~megabatch.build.build_run` builds from the paper's recipe (emulated workers, ghost
  BN, RMSprop warm-up, fp16 gradient rounding), on synthetic images already on the device,
  for each precision x memory format (x torch.compile of the fastest), beside a plain
  PyTorch loop (torchvision ResNet-50, fp32, NCHW, eager, nn.BatchNorm2d, SGD): the
  ratio says what megabatch costs or gains over a user's own loop;
* what emulated workers' BN costs at full batch: groups of 32 against one group;
* the input pipeline on a folder of real JPEGs (:mod:`megabatch.bench_input`);
* end to end from that folder with the fastest setting, peak memory, and the model FLOP
  utilization against the measured throughput of a large matmul in the same precision;
* where the time goes: whether the input pipeline keeps up with the fastest step, and
  what end to end keeps of the step's speed (:mod:`megabatch.bench_report`).

Warm-up steps are not timed; then ``repeats`` timings of ``steps`` steps each give the
median images/s and the min-max spread. The JSON result, with its provenance, is what
``megabatch simulate --from-bench`` reads. torch is imported inside the functions, so
that the command line starts without it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from megabatch.bench_flags import at_least, wants_gpu
from megabatch.bench_report import COLUMNS, output_path, row, time_lines, where_the_time_goes
from megabatch.bench_timing import measure, peak_rss_bytes, release
from megabatch.errors import UserError

RECIPE = "paper-resnet50-imagenet-32k"
BASELINE = "baseline torchvision fp32 NCHW eager SGD"
FLOP_PER_IMAGE_224 = 24.5e9  # ResNet-50: 4.1 GMAC forward = 8.2 GFLOP, backward twice that
GHOST_GROUP = 32  # the paper's images per worker


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` flags to ``parser`` (a subcommand's parser)."""
    from megabatch import bench_small

    add = parser.add_argument
    add("--model", default="resnet50", choices=["resnet50", "small-cnn"],
        help="resnet50 (the paper's recipe, the input pipeline, end to end) or small-cnn (the demo "
             "recipe's step beside a plain PyTorch loop, ghost against plain BN, the noise scale's cost)")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to measure (auto: a GPU if any)")
    add("--image-size", type=int, metavar="N", help="resnet50: image side (224 on a GPU, 64 on a CPU)")
    add("--batch", type=int, metavar="N", help="images per step (resnet50: 256 on a GPU, 32 on a CPU; "
                                               "small-cnn: the demo recipe's)")
    add("--steps", type=int, metavar="N", help="steps per timed repeat (resnet50: 20 on a GPU, 5 on a CPU; "
                                               f"small-cnn: about {bench_small.REPEAT_SECONDS:g} s of them)")
    add("--warmup", type=int, metavar="N", help="untimed steps before each measurement (3 on a GPU, 1 on a CPU; "
                                                "small-cnn: 2 on a CPU)")
    add("--repeats", type=int, metavar="N", help="timed repeats: median and min-max (resnet50: 5 on a GPU, "
                                                 f"3 on a CPU; small-cnn: {bench_small.REPEATS}, interleaved)")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="resnet50: also measure torch.compile on the fastest eager setting (default: on a GPU)")
    add("--data", metavar="DIR", help="resnet50: ImageNet-layout folder of JPEGs for the input pipeline "
                                      "(default: a generated one, 10 classes x 64 images of 320x320)")
    add("--out", metavar="DIR", default="benchmarks/results",
        help="folder of the result [small-cnn-]<device>-<date>.json (benchmarks/results)")
    add("--quick", action="store_true", help="a tiny run for tests (resnet50: 32x32, batch 8, one step, fp32 only; "
                                             "small-cnn: batch 128 in micro-batches of 64, one step)")


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
    quick: bool
    note: str


@dataclass(frozen=True)
class Config:
    precision: str
    memory_format: str
    compile: bool = False

    @property
    def name(self) -> str:
        return f"megabatch {self.precision} {self.memory_format} {'compiled' if self.compile else 'eager'}"


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
    return Settings(
        device="cuda:0" if gpu else "cpu", image_size=size, batch=batch, steps=steps, warmup=warmup,
        repeats=repeats, per_worker_batch=group,
        precisions=("fp32",) if args.quick else ("fp32", "bf16", "fp16") if gpu else ("fp32", "bf16"),
        memory_formats=("contiguous",) if args.quick else ("contiguous", "channels_last"),
        compile=args.compile if args.compile is not None else gpu and not args.quick,
        quick=args.quick, note=note.lstrip("; "))


def megabatch_run(s: Settings, config: Config, per_worker: int, out: Path, jpegs: tuple | None = None):
    """A Run of the paper's recipe at this batch, on synthetic images (moved to the device
    beforehand) or, with ``jpegs`` = (folder, decoder, workers), on a JPEG folder."""
    from megabatch import bench_input, recipe as recipes
    from megabatch.data.images import ImageTensors
    from megabatch.progress import Progress
    from megabatch.build import build_run
    from megabatch.schedules import recipe_values
    from megabatch.train import set_hyperparameters

    b = s.batch
    values = {"batch.global_batch": b, "batch.micro_batch": b, "batch.per_worker_batch": per_worker,
              "train.precision": config.precision, "train.memory_format": config.memory_format,
              "train.compile": config.compile, "train.device": s.device.split(":")[0]}
    if jpegs is None:
        values.update({"data.dataset": "synthetic", "data.synthetic_size": [2 * b, b, s.image_size, 3, 1000]})
    else:
        values.update({"data.image_size": s.image_size, "data.resize_size": bench_input.resize_size(s.image_size),
                       "data.decoder": jpegs[1], "data.workers": jpegs[2]})
    recipe = recipes.load(RECIPE, values=values)
    run = build_run(recipe, str(jpegs[0]) if jpegs else None, out, Progress(1, 1, enabled=False))
    d = run.train_data
    if jpegs is None:  # time the step, not host-to-device copies
        run.train_data = ImageTensors(d.images.to(run.device), d.labels.to(run.device), d.mean, d.std, d.classes)
    else:  # one epoch lasts the whole measurement: the loader's workers start once
        run.train_data = bench_input.repeated(d, b * (s.warmup + 2 + s.repeats * s.steps))
    set_hyperparameters(run.optimizer, *recipe_values(recipe, 0.0, run.steps_per_epoch))
    return run


def time_megabatch(s: Settings, config: Config, per_worker: int, out: Path, jpegs: tuple | None = None) -> dict:
    """The real megabatch step, timed: ``train_step`` on the Run's own micro-batches."""
    from megabatch import bench_input
    from megabatch.train import train_step

    run = megabatch_run(s, config, per_worker, out, jpegs)
    feed = bench_input.steps(run.train_data, run.plan, run.device, run.recipe.data.augment, run.recipe.train.seed)
    losses = []
    # Compilation happens in the first calls: never timed.
    result = measure(lambda: losses.append(train_step(run, next(feed)).loss), s, s.batch,
                     max(s.warmup, 2) if config.compile else None)
    feed.close()
    bad = sum(not loss == loss or abs(loss) == float("inf") for loss in losses)
    if bad:
        result["non_finite_losses"] = bad
        print(f"warning: {config.name}: {bad} non-finite losses (those steps skip the optimizer)", file=sys.stderr)
    del run
    release()
    return result


def time_baseline(s: Settings) -> dict:
    """A user's own loop: torchvision ResNet-50, fp32, NCHW, eager, plain BN, momentum SGD,
    and PyTorch's defaults (no cuDNN autotuning, which megabatch's runs turn on)."""
    import torch
    import torch.nn.functional as F
    import torchvision

    from megabatch.data import synthetic

    torch.manual_seed(0)
    model = torchvision.models.resnet50().to(s.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1 * s.batch / 256, momentum=0.9)
    train, _ = synthetic.make(s.batch, 1, s.image_size, 3, 1000)
    x, y = train.batch(torch.arange(s.batch), s.device)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    autotune, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        result = measure(step, s, s.batch)
    finally:
        torch.backends.cudnn.benchmark = autotune
    del model, optimizer
    release()
    return result


def matmul_flops(s: Settings, precision: str) -> float:
    """FLOP/s of a large square matmul in ``precision`` (fp32 on CUDA: with TF32, which
    cuDNN convolutions use by default): the device's attainable matrix throughput."""
    import torch

    n = matmul_size(s)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a, b = (torch.randn(n, n, device=s.device).to(dtype) for _ in range(2))
    calls = 10 if s.device != "cpu" else 1
    timed = replace(s, steps=5 if s.device != "cpu" else 2, repeats=1 if s.quick else 3)
    previous = torch.get_float32_matmul_precision()
    if s.device != "cpu":
        torch.set_float32_matmul_precision("high")
    try:
        timing = measure(lambda: [a @ b for _ in range(calls)], timed, 1, warmup=1)
    finally:
        torch.set_float32_matmul_precision(previous)
    return 2 * n ** 3 * calls * timing["images_per_s"]


def matmul_size(s: Settings) -> int:
    return 512 if s.quick else 8192 if s.device != "cpu" else 2048


def run(args: argparse.Namespace) -> int:
    """Measure, print the table as it goes, write the JSON result; 0 on success."""
    import torch

    from megabatch import bench_input, bench_small, provenance, recipe as recipes

    if args.model == "small-cnn":
        return bench_small.run(args)
    s = settings(args)
    device = torch.device(s.device)
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="megabatch-bench-") as tmp:
        tmp = Path(tmp)
        root = bench_input.jpeg_folder(args.data, s.quick, tmp)
        images = len(bench_input.open_folder(root, s.image_size))  # a bad layout fails now, not in an hour
        if images < s.batch:
            raise UserError(f"--data {root} holds {images} training images, fewer than --batch {s.batch}")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create --out {out}: {err.strerror}") from None
        device_name = provenance.device_name(device)
        print(f"megabatch bench on {device_name}: ResNet-50 ({RECIPE}), {s.image_size}x{s.image_size} images, "
              f"batch {s.batch} = {s.batch // s.per_worker_batch} emulated workers x {s.per_worker_batch}")
        if s.note:
            print(f"note: {s.note}")
        print(f"{s.repeats} repeat(s) of {s.steps} step(s) after {s.warmup} warm-up step(s): median images/s "
              f"and min-max; MFU at {flop_per_image(s) / 1e9:.2f} GFLOP per image per step")
        peak = {p: matmul_flops(s, p) for p in s.precisions}
        print("matrix throughput: " + ", ".join(f"{p} {f / 1e12:.3g} TFLOP/s" for p, f in peak.items()))

        def mfu(m: dict, precision: str) -> float:
            return flop_per_image(s) * m["images_per_s"] / peak[precision]

        print(f"\n{COLUMNS}\ntrain step (synthetic images on the device)")
        base = time_baseline(s)
        print(row(BASELINE, base, base["images_per_s"], mfu(base, "fp32")))
        entries: list[tuple[Config, dict]] = []

        def train(config: Config) -> None:
            m = time_megabatch(s, config, s.per_worker_batch, tmp / "run")
            entries.append((config, m))
            print(row(config.name, m, base["images_per_s"], mfu(m, config.precision)), flush=True)

        for precision in s.precisions:
            for layout in s.memory_formats:
                train(Config(precision, layout))
        if s.compile:
            fastest = max(entries, key=lambda e: e[1]["images_per_s"])[0]
            train(Config(fastest.precision, fastest.memory_format, compile=True))
        best, best_m = max(entries, key=lambda e: e[1]["images_per_s"])

        ghost_config, ghost = max(((c, m) for c, m in entries if c.precision == "fp32" and not c.compile),
                                  key=lambda e: e[1]["images_per_s"])
        plain = time_megabatch(s, ghost_config, s.batch, tmp / "run")
        print(row(f"{ghost_config.name}, plain BN", plain, base["images_per_s"], mfu(plain, "fp32")))
        ghost_ratio = ghost["images_per_s"] / plain["images_per_s"]
        print(f"  ghost BN at full batch: {s.batch // s.per_worker_batch} groups of {s.per_worker_batch} run "
              f"at {ghost_ratio:.2f}x the images/s of plain BN")

        print(f"input pipeline (JPEG folder, {images} training images, onto {s.device})")
        readings = []
        for pipeline in bench_input.pipelines(device):
            # The warm-up also takes what the workers queued while starting (4 batches each),
            # so that the timed part sees what they deliver, not a backlog.
            warm = max(s.warmup, 1) + 4 * pipeline.workers
            feed = bench_input.reader(root, pipeline, s.image_size, s.batch,
                                      s.batch * (warm + s.repeats * s.steps), device)
            m = measure(lambda: [None for _ in next(feed)], s, s.batch, warm)
            feed.close()
            readings.append((pipeline, m))
            print(row(pipeline.name(device), m), flush=True)
        reading, reading_m = max(readings, key=lambda r: r[1]["images_per_s"])

        print(f"end to end (from the JPEG folder; {reading.name(device)})")
        e2e = time_megabatch(s, best, s.per_worker_batch, tmp / "e2e", (root, reading.decoder, reading.workers))
        if "peak_memory_bytes" not in e2e:
            e2e["peak_memory_bytes"] = peak_rss_bytes()
        print(row(best.name, e2e, base["images_per_s"], mfu(e2e, best.precision)))
        print(f"  peak memory {e2e['peak_memory_bytes'] / 2 ** 30:.2f} GiB "
              f"({'torch.cuda.max_memory_allocated' if s.device != 'cpu' else 'peak RSS of the process'})")
        summary = where_the_time_goes(best_m["images_per_s"], base["images_per_s"], reading_m["images_per_s"],
                                      e2e["images_per_s"])
        print("\n" + "\n".join(time_lines(summary, best.name, reading.name(device))))

    def train_entry(name: str, m: dict, precision: str, extra: dict) -> dict:
        return {"name": name, "images_per_s": m["images_per_s"], "spread": m["spread"], "batch_size": s.batch,
                "ratio_to_baseline": m["images_per_s"] / base["images_per_s"], "mfu": mfu(m, precision),
                **extra, "per_repeat": m["per_repeat"], **({"peak_memory_bytes": m["peak_memory_bytes"]}
                                                     if "peak_memory_bytes" in m else {})}

    result = {
        "device": device_name, **provenance.collect(device), "model": "resnet50", "note": s.note,
        "settings": {**asdict(s), "recipe": RECIPE, "data": args.data or "generated (megabatch.data.tiny_imagenet)",
                     "training_images": images,
                     "cudnn_benchmark": {"baseline": False, "megabatch": recipes.load(RECIPE).train.cudnn_benchmark}},
        "train_step": [train_entry(c.name, m, c.precision, {**asdict(c), "per_worker_batch": s.per_worker_batch})
                       for c, m in entries] + [train_entry(BASELINE, base, "fp32", {})],
        "ghost_bn": {"config": ghost_config.name, "batch_size": s.batch, "per_worker_batch": s.per_worker_batch,
                     "ghost_images_per_s": ghost["images_per_s"], "ghost_spread": ghost["spread"],
                     "plain_images_per_s": plain["images_per_s"], "plain_spread": plain["spread"],
                     "ratio": ghost_ratio, "ratio_is": "images/s with per-worker BN / with plain BN"},
        "input_pipeline": [{"name": p.name(device), "decoder": p.decoder, "workers": p.workers,
                            "images_per_s": m["images_per_s"], "spread": m["spread"], "batch_size": s.batch,
                            "per_repeat": m["per_repeat"]} for p, m in readings],
        "end_to_end": {"name": best.name, "decoder": reading.decoder, "workers": reading.workers,
                       "images_per_s": e2e["images_per_s"], "spread": e2e["spread"], "batch_size": s.batch,
                       "ratio_to_baseline": e2e["images_per_s"] / base["images_per_s"],
                       "peak_memory_bytes": e2e["peak_memory_bytes"],
                       "peak_memory_is": "torch.cuda.max_memory_allocated" if s.device != "cpu"
                       else "peak RSS of the whole process (resource.getrusage)", "mfu": mfu(e2e, best.precision)},
        "where_the_time_goes": summary,
        "mfu": {"flop_per_image": flop_per_image(s), "matmul_flops": peak, "matmul_size": matmul_size(s),
                "best_train_step": {"name": best.name, "mfu": mfu(best_m, best.precision)},
                "end_to_end": mfu(e2e, best.precision)},
    }
    path = output_path(out, device_name)
    try:
        path.write_text(json.dumps(result, indent=2) + "\n")
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror}") from None
    print(f"\nwrote {path}")
    return 0


def flop_per_image(s: Settings) -> float:
    """FLOP of one training step per image (forward and backward) at this image size."""
    return FLOP_PER_IMAGE_224 * (s.image_size / 224) ** 2
