"""The ``megabatch bench`` command: its flags, and what it measures on ResNet-50.

``--model small-cnn`` measures the demo recipe's step against a plain PyTorch loop
(:mod:`megabatch.bench.small_cnn`). For ResNet-50 (the default), one process measures:

* the train step (:mod:`megabatch.bench.steps`): megabatch's own
  :func:`~megabatch.train.train_step` on a Run that :func:`~megabatch.build.build_run`
  builds from the paper's recipe (emulated workers, ghost BN, RMSprop warm-up, fp16
  gradient rounding), on synthetic images already on the device,
  for each precision x memory format (x torch.compile of the fastest), each beside a plain
  PyTorch loop at the same precision, memory format and compile setting (torchvision
  ResNet-50, nn.BatchNorm2d, momentum SGD, a GradScaler in fp16): the ratio prices
  megabatch's emulation alone;
* what emulated workers' BN costs at full batch: groups of 32 against one group;
* where one step's time goes (``--profile``, the default on a GPU): a ``torch.profiler``
  summary of the fastest configuration and of its plain twin: device time and kernels per
  step, host waits for the device, and the operators that take the most time;
* the input pipeline on a folder of real JPEGs (:mod:`megabatch.bench.inputs`);
* end to end from that folder with the fastest eager setting, with the ``device`` decoder
  and with the fastest reader, peak memory, and the model FLOP utilization against the
  measured throughput of a large matmul in the same precision; with ``--compile``, once
  more with the compiled step (``--compile-mode``) from the reader that did best;
* where the time goes: whether the input pipeline keeps up with the fastest eager step, and
  what end to end keeps of the step's speed (:mod:`megabatch.bench.report`).

Warm-up steps are not timed; then ``repeats`` timings of ``steps`` steps each give the
median images/s and the min-max spread. The JSON result, with its provenance, is written
after every part (``"complete": false`` until the end), so a run cut short keeps what it
measured; it is what ``megabatch simulate --from-bench`` reads. torch is imported inside
the functions, so that the command line starts without it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from megabatch.bench import profiling
from megabatch.bench.report import COLUMNS, output_path, row, time_lines, where_the_time_goes
from megabatch.bench.settings import COMPILE_MODES, Settings, settings
from megabatch.bench.steps import RECIPE, Config, plain_name, time_megabatch, time_plain
from megabatch.bench.timing import measure, peak_rss_bytes
from megabatch.errors import UserError

FLOP_PER_IMAGE_224 = 24.5e9  # ResNet-50: 4.1 GMAC forward = 8.2 GFLOP, backward twice that


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` flags to ``parser`` (a subcommand's parser)."""
    from megabatch.bench import small_cnn

    add = parser.add_argument
    add("--model", default="resnet50", choices=["resnet50", "small-cnn"],
        help="resnet50 (the paper's recipe, the input pipeline, end to end) or small-cnn (the demo "
             "recipe's step beside a plain PyTorch loop, ghost against plain BN, the noise scale's cost)")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to measure (auto: a GPU if any)")
    add("--image-size", type=int, metavar="N", help="resnet50: image side (224 on a GPU, 64 on a CPU)")
    add("--batch", type=int, metavar="N", help="images per step (resnet50: 256 on a GPU, 32 on a CPU; "
                                               "small-cnn: the demo recipe's)")
    add("--steps", type=int, metavar="N", help="steps per timed repeat (resnet50: 20 on a GPU, 5 on a CPU; "
                                               f"small-cnn: about {small_cnn.REPEAT_SECONDS:g} s of them)")
    add("--warmup", type=int, metavar="N", help="untimed steps before each measurement (3 on a GPU, 1 on a CPU; "
                                                "small-cnn: 2 on a CPU)")
    add("--repeats", type=int, metavar="N", help="timed repeats: median and min-max (resnet50: 5 on a GPU, "
                                                 f"3 on a CPU; small-cnn: {small_cnn.REPEATS}, interleaved)")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="resnet50: also measure torch.compile on the fastest eager setting (default: on a GPU)")
    add("--compile-mode", metavar="MODE",
        help=f"resnet50: torch.compile's mode for both steps, one of {', '.join(COMPILE_MODES)} "
             f"(reduce-overhead: CUDA graphs; default: default)")
    add("--precisions", metavar="LIST", help="resnet50: comma-separated, of fp32,bf16,fp16 "
                                             "(default: all three on a GPU, fp32,bf16 on a CPU)")
    add("--memory-formats", metavar="LIST", help="resnet50: comma-separated, of contiguous,channels_last "
                                                 "(default: both)")
    add("--profile", action=argparse.BooleanOptionalAction, default=None,
        help="resnet50: a torch.profiler summary of the fastest step and its plain twin (default: on a GPU)")
    add("--data", metavar="DIR", help="resnet50: ImageNet-layout folder of JPEGs for the input pipeline "
                                      "(default: a generated one, 10 classes x 64 images of 320x320)")
    add("--out", metavar="DIR", default="benchmarks/results",
        help="folder of the result [small-cnn-]<device>-<date>.json (benchmarks/results)")
    add("--quick", action="store_true", help="a tiny run for tests (resnet50: 32x32, batch 8, one step, fp32 only; "
                                             "small-cnn: batch 128 in micro-batches of 64, one step)")


def matmul_flops(s: Settings, precision: str) -> float:
    """FLOP/s of a large square matmul in ``precision`` (fp32 on CUDA: with TF32 where the
    recipe's ``train.tf32`` asks for it, as its steps are): the device's attainable matrix
    throughput."""
    import torch

    from megabatch import recipe as recipes
    from megabatch.build import backends

    n = matmul_size(s)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a, b = (torch.randn(n, n, device=s.device).to(dtype) for _ in range(2))
    calls = 10 if s.device != "cpu" else 1
    timed = replace(s, steps=5 if s.device != "cpu" else 2, repeats=1 if s.quick else 3)
    with backends(torch.device(s.device), recipes.load(RECIPE)):
        timing = measure(lambda: [a @ b for _ in range(calls)], timed, 1, warmup=1)
    return 2 * n ** 3 * calls * timing["images_per_s"]


def matmul_size(s: Settings) -> int:
    return 512 if s.quick else 8192 if s.device != "cpu" else 2048


def run(args: argparse.Namespace) -> int:
    """Measure, print the table as it goes, write the JSON result after every part; 0 on success."""
    import torch

    from megabatch import provenance, recipe as recipes
    from megabatch.bench import inputs, small_cnn
    from megabatch.nn import ghost_bn_implementation

    if args.model == "small-cnn":
        return small_cnn.run(args)
    s = settings(args)
    device = torch.device(s.device)
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="megabatch-bench-") as tmp:
        tmp = Path(tmp)
        root = inputs.jpeg_folder(args.data, s.quick, tmp)
        images = len(inputs.open_folder(root, s.image_size))  # a bad layout fails now, not in an hour
        if images < s.batch:
            raise UserError(f"--data {root} holds {images} training images, fewer than --batch {s.batch}")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create --out {out}: {err.strerror}") from None
        device_name = provenance.device_name(device)
        path = output_path(out, device_name)
        paper = recipes.load(RECIPE)
        result: dict = {
            "device": device_name, **provenance.collect(device), "model": "resnet50", "note": s.note,
            "complete": False,
            "settings": {**asdict(s), "recipe": RECIPE, "data": args.data or "generated (megabatch.data.tiny_imagenet)",
                         "training_images": images, "ghost_bn": ghost_bn_implementation(device),
                         "cudnn_benchmark": paper.train.cudnn_benchmark, "tf32": paper.train.tf32}}

        def save() -> None:
            try:
                path.write_text(json.dumps(result, indent=2) + "\n")
            except OSError as err:
                raise UserError(f"cannot write {path}: {err.strerror}") from None

        print(f"megabatch bench on {device_name}: ResNet-50 ({RECIPE}), {s.image_size}x{s.image_size} images, "
              f"batch {s.batch} = {s.batch // s.per_worker_batch} emulated workers x {s.per_worker_batch}")
        if s.note:
            print(f"note: {s.note}")
        print(f"ghost BN (eager): {result['settings']['ghost_bn']}")
        print(f"{s.repeats} repeat(s) of {s.steps} step(s) after {s.warmup} warm-up step(s): median images/s "
              f"and min-max; MFU at {flop_per_image(s) / 1e9:.2f} GFLOP per image per step")
        peak = {p: matmul_flops(s, p) for p in s.precisions}
        print("matrix throughput: " + ", ".join(f"{p} {f / 1e12:.3g} TFLOP/s" for p, f in peak.items()))
        result["mfu"] = {"flop_per_image": flop_per_image(s), "matmul_flops": peak, "matmul_size": matmul_size(s)}
        save()

        def mfu(m: dict, precision: str) -> float:
            return flop_per_image(s) * m["images_per_s"] / peak[precision]

        print(f"\n{COLUMNS}\ntrain step (synthetic images on the device), each beside a plain PyTorch loop "
              f"at the same settings")
        pairs: list[tuple[Config, dict, dict]] = []  # (config, megabatch, plain)

        def train(config: Config) -> None:
            m = time_megabatch(s, config, s.per_worker_batch, tmp / "run", profile=s.profile)
            plain = time_plain(s, config, profile=s.profile)
            pairs.append((config, m, plain))
            print(row(config.name, m, plain["images_per_s"], mfu(m, config.precision)))
            print(row(plain_name(config), plain, plain["images_per_s"], mfu(plain, config.precision)), flush=True)
            for name, reading in ((config.name, m), (plain_name(config), plain)):
                if reading.get("cudagraph_skips"):
                    print(f"  {name}: {reading['cudagraph_skips']} compiled graph(s) ran without CUDA graphs "
                          f"(TORCH_LOGS=cudagraphs says why)")
                if "profile" in reading:
                    print("\n".join(profiling.lines(name, reading["profile"], top=3)), flush=True)
            result["train_step"] = [step_entry(s, c, mb, pl, mfu) for c, mb, pl in pairs]
            save()

        for precision in s.precisions:
            for layout in s.memory_formats:
                train(Config(precision, layout))
        # The fastest eager setting serves ghost BN and end to end; compilation (minutes on a
        # GPU) comes last, so that a run cut short has everything else.
        best, best_m, best_plain = max(pairs, key=lambda e: e[1]["images_per_s"])

        ghost_config, ghost = best, best_m
        plain_bn = time_megabatch(s, ghost_config, s.batch, tmp / "run")
        print(row(f"{ghost_config.name}, plain BN", plain_bn, None, mfu(plain_bn, ghost_config.precision)))
        ghost_ratio = ghost["images_per_s"] / plain_bn["images_per_s"]
        print(f"  ghost BN at full batch: {s.batch // s.per_worker_batch} groups of {s.per_worker_batch} run "
              f"at {ghost_ratio:.2f}x the images/s of plain BN")
        result["ghost_bn"] = {
            "config": ghost_config.name, "batch_size": s.batch, "per_worker_batch": s.per_worker_batch,
            "ghost_images_per_s": ghost["images_per_s"], "ghost_spread": ghost["spread"],
            "plain_images_per_s": plain_bn["images_per_s"], "plain_spread": plain_bn["spread"],
            "ratio": ghost_ratio, "ratio_is": "images/s with per-worker BN / with plain BN"}
        save()

        print(f"input pipeline (JPEG folder, {images} training images, onto {s.device})")
        readings = []
        for pipeline in inputs.pipelines(device):
            # The warm-up also takes what the workers queued while starting (4 batches each),
            # so that the timed part sees what they deliver, not a backlog.
            warm = max(s.warmup, 1) + 4 * pipeline.workers
            feed = inputs.reader(root, pipeline, s.image_size, s.batch,
                                 s.batch * (warm + s.repeats * s.steps), device)
            m = measure(lambda: [None for _ in next(feed)], s, s.batch, warm)
            feed.close()
            readings.append((pipeline, m))
            print(row(pipeline.name(device), m), flush=True)
            result["input_pipeline"] = [{"name": p.name(device), "decoder": p.decoder, "workers": p.workers,
                                         "images_per_s": r["images_per_s"], "spread": r["spread"],
                                         "batch_size": s.batch, "per_repeat": r["per_repeat"]} for p, r in readings]
            save()
        reading, reading_m = max(readings, key=lambda r: r[1]["images_per_s"])

        # End to end with the device decoder (nvJPEG on a GPU), and with the fastest reader if another.
        on_device = next(p for p, _ in readings if p.decoder == "device")
        ends: list[tuple[inputs.Pipeline, dict]] = []

        def end_to_end(config: Config, plain: dict, pipeline: inputs.Pipeline) -> None:
            print(f"end to end (from the JPEG folder; {pipeline.name(device)})")
            e2e = time_megabatch(s, config, s.per_worker_batch, tmp / "e2e", (root, pipeline.decoder, pipeline.workers),
                                 profile=s.profile)
            if "peak_memory_bytes" not in e2e:
                e2e["peak_memory_bytes"] = peak_rss_bytes()
            print(row(config.name, e2e, plain["images_per_s"], mfu(e2e, config.precision)))
            print(f"  peak memory {e2e['peak_memory_bytes'] / 2 ** 30:.2f} GiB "
                  f"({'torch.cuda.max_memory_allocated' if s.device != 'cpu' else 'peak RSS of the process'})")
            if "profile" in e2e:
                print("\n".join(profiling.lines(f"{config.name}, end to end", e2e["profile"], top=3)))
            ends.append((pipeline, {
                "name": config.name, "decoder": pipeline.decoder, "workers": pipeline.workers,
                "images_per_s": e2e["images_per_s"], "spread": e2e["spread"], "batch_size": s.batch,
                "ratio_to_plain": e2e["images_per_s"] / plain["images_per_s"],
                "peak_memory_bytes": e2e["peak_memory_bytes"],
                "peak_memory_is": "torch.cuda.max_memory_allocated" if s.device != "cpu"
                else "peak RSS of the whole process (resource.getrusage)", "mfu": mfu(e2e, config.precision),
                **({"profile": e2e["profile"]} if "profile" in e2e else {})}))
            result["end_to_end_by_decoder"] = [entry for _, entry in ends]
            result["end_to_end"] = max(result["end_to_end_by_decoder"], key=lambda e: e["images_per_s"])
            result["mfu"]["end_to_end"] = result["end_to_end"]["mfu"]
            save()

        for pipeline in dict.fromkeys([on_device, reading]):
            end_to_end(best, best_plain, pipeline)
        best_reader, end = max(ends, key=lambda e: e[1]["images_per_s"])

        # Where the time goes compares end to end with the eager step it ran.
        summary = where_the_time_goes(best_m["images_per_s"], best_plain["images_per_s"], reading_m["images_per_s"],
                                      end["images_per_s"])
        eager = best
        if s.compile:
            compiled = Config(best.precision, best.memory_format, compile=True, compile_mode=s.compile_mode)
            train(compiled)
            # End to end again with the compiled step, from the reader that fed the eager one best:
            # an input pipeline can only be judged against the fastest step it must feed.
            end_to_end(compiled, pairs[-1][2], best_reader)
        best, best_m, best_plain = max(pairs, key=lambda e: e[1]["images_per_s"])
        result["mfu"]["best_train_step"] = {"name": best.name, "mfu": mfu(best_m, best.precision)}
        if s.profile:
            result["profile"] = {"config": best.name, "megabatch": best_m.get("profile"),
                                 "plain": best_plain.get("profile")}
        print("\n" + "\n".join(time_lines(summary, eager.name, reading.name(device))))
        result["where_the_time_goes"] = summary
        result["complete"] = True
        save()
    print(f"\nwrote {path}")
    return 0


def step_entry(s: Settings, config: Config, m: dict, plain: dict, mfu) -> dict:
    """One ``train_step`` entry of the result: megabatch at ``config``, its plain twin inside."""
    def reading(x: dict) -> dict:
        return {"images_per_s": x["images_per_s"], "spread": x["spread"], "per_repeat": x["per_repeat"],
                "mfu": mfu(x, config.precision),
                **{k: x[k] for k in ("peak_memory_bytes", "profile", "cudagraph_skips") if k in x}}

    return {"name": config.name, **asdict(config), "batch_size": s.batch, "per_worker_batch": s.per_worker_batch,
            **reading(m), "ratio_to_plain": m["images_per_s"] / plain["images_per_s"],
            "plain": {"name": plain_name(config), **reading(plain)}}


def flop_per_image(s: Settings) -> float:
    """FLOP of one training step per image (forward and backward) at this image size."""
    return FLOP_PER_IMAGE_224 * (s.image_size / 224) ** 2
