"""The ``megabatch`` command: parse, load the recipe, call one function per command.

Bad input ends with one line ``megabatch: error: ...`` and exit status 2 (1 for a
diverged run); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from megabatch import __version__
from megabatch.bench.command import configure_parser as configure_bench
from megabatch.errors import UserError
from megabatch.simulate.command import configure_parser as configure_simulate

if TYPE_CHECKING:
    from megabatch.batching import BatchPlan


def cmd_train(args: argparse.Namespace) -> int:
    from megabatch.build import train

    train(args.recipe, args.set, args.resume, args.out, args.data)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from megabatch import checkpoint
    from megabatch.build import (AUTOCAST_DTYPES, build_model, configure_backends, memory_format, resolve_device,
                                 resolve_recipe)
    from megabatch.data import hold_out, load_datasets
    from megabatch.recipe import from_dict
    from megabatch.train import evaluate, recompute_bn_statistics

    state = checkpoint.load(args.checkpoint, require_finite=True)
    saved = from_dict(state["recipe"])
    device = resolve_device(args.device or saved.train.device)
    recipe = resolve_recipe(saved, device)
    configure_backends(device, recipe)  # the run's arithmetic (train.tf32) and autotuning
    train, test = load_datasets(recipe.data, args.data, device.type)
    model = build_model(recipe, test.channels, len(test.classes), device)
    model.load_state_dict(state["model"])
    layout, dtype = memory_format(recipe.train.memory_format), AUTOCAST_DTYPES[recipe.train.precision]

    def report(statistics: str) -> None:
        result = evaluate(model, test, device, batch_size=max(recipe.batch.micro_batch, 256), layout=layout,
                          autocast_dtype=dtype)
        print(f"  {statistics}: top-1 {result['test_top1']:.2f}%  top-5 {result['test_top5']:.2f}%  "
              f"loss {result['test_loss']:.4f}")

    print(f"{args.checkpoint}: {recipe.name} after {state['iteration']} steps, {len(test)} test images")
    report("stored BN statistics")
    if args.recompute_bn is not None:
        train, _ = hold_out(train, recipe.data.validation_images)  # the images the run trained on
        plan = bn_plan(args.recompute_bn, recipe, train, device)
        recompute_bn_statistics(model, train, plan, recipe.train.seed, recipe.data.augment, device, layout, dtype)
        report(f"BN statistics of {plan.global_batch} training images ({plan.workers} workers x "
               f"{plan.per_worker_batch})")
    return 0


def bn_plan(images: int, recipe, train, device) -> BatchPlan:
    """The batch that ``eval --recompute-bn`` takes its statistics from: ``images`` (0: the
    recipe's global batch) in the recipe's worker groups; the micro-batches (which do not change
    the statistics) are the device's automatic ones."""
    from megabatch.batching import BatchPlan, max_micro_batch

    images = images or recipe.batch.global_batch
    if images < 0:
        raise UserError(f"--recompute-bn {images}: give a number of training images, e.g. {recipe.batch.global_batch}")
    if images > len(train):
        raise UserError(f"--recompute-bn {images}: the recipe has {len(train)} training images; ask for fewer")
    if images % recipe.batch.per_worker_batch:
        raise UserError(f"--recompute-bn {images} is not a whole number of workers of "
                        f"{recipe.batch.per_worker_batch} images (batch.per_worker_batch): give a multiple of it")
    return BatchPlan.create(images, recipe.batch.per_worker_batch, max_micro_batch=max_micro_batch(device.type))


def cmd_recipes(args: argparse.Namespace) -> int:
    from megabatch import recipe as recipes

    names = recipes.builtin_names()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {recipes.describe(name)}")
    return 0


def parse_epochs(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--epochs {text!r} must be comma-separated numbers, e.g. 0,5,10.5") from None


def cmd_schedule(args: argparse.Namespace) -> int:
    from megabatch import recipe as recipes
    from megabatch.data import train_size
    from megabatch.schedules import epoch_settings, recipe_values

    recipe = recipes.load(args.recipe, args.set)
    steps = max(1, train_size(recipe.data) // recipe.batch.global_batch)
    settings = epoch_settings(recipe, steps)
    if recipe.schedule.unit == "step":
        print(f"# schedule written in optimizer steps: {steps} steps per epoch at global batch "
              f"{recipe.batch.global_batch}", file=sys.stderr)
    elif settings.scale != 1.0:
        print(f"# schedule written for {recipe.schedule.reference_epochs:g} epochs, stretched "
              f"x{settings.scale:.4g} to {recipe.train.epochs} epochs: boundaries "
              f"{[round(b, 4) for b in settings.boundaries]}, alpha_sgd center "
              f"{settings.alpha_center:.4g} period {settings.alpha_period:.4g}", file=sys.stderr)
    if args.epochs is not None:
        epochs = parse_epochs(args.epochs)
    else:
        if args.every <= 0:
            raise UserError(f"--every must be > 0, got {args.every}")
        count = int(recipe.train.epochs / args.every + 1e-9)
        epochs = [i * args.every for i in range(count + 1)]
    rows = [(e, *recipe_values(recipe, e, steps)) for e in epochs]
    print("epoch,lr,alpha_sgd")
    for epoch, lr, alpha in rows:
        print(f"{epoch:g},{lr:.6g},{alpha:.6g}")
    if args.plot:
        from megabatch.plots import plot_schedule

        fine = max(recipe.train.epochs * 20, 200)
        dense = [(e, *recipe_values(recipe, e, steps)) for e in
                 (i * recipe.train.epochs / fine for i in range(fine + 1))]
        if plot_schedule(dense, Path(args.plot), title=f"{recipe.name} (global batch "
                         f"{recipe.batch.global_batch})"):
            print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    import json

    from megabatch import provenance
    from megabatch.errors import Preempted
    from megabatch.study import load_spec, run_study
    from megabatch.study.report import plot, write_csv, write_markdown
    from megabatch.study.runner import read_result, unfinished

    batches, seeds = _integers(args.batches, "--batches"), _integers(args.seeds, "--seeds")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    spec = load_spec(args.spec, epochs=args.epochs, batches=batches, seeds=seeds, extra_set=args.set,
                     methods=methods)
    out = Path(args.out) if args.out else Path("runs") / f"study-{spec.name}"
    out.mkdir(parents=True, exist_ok=True)
    import torch

    # --methods and --seeds run some of the grid's own runs: the folder, its provenance and
    # its report stay those of the whole grid. --epochs, --batches and --set make another grid.
    grid = spec.whole()
    stopped = None
    if not args.report:  # the provenance of the runs, not of a later report
        (out / "study.json").write_text(json.dumps(
            {**provenance.collect(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
             "spec": args.spec, "epochs": grid.epochs, "batches": list(grid.batches),
             "runs": len(grid.runs())}
            | ({"this_invocation": {"methods": methods, "seeds": seeds, "runs": len(spec.runs())}}
               if methods or seeds else {}), indent=2) + "\n")
        try:
            run_study(spec, out, args.data, args.parallel)
        except Preempted as e:  # the report of what finished is still written
            stopped = e
    # The report reads the runs from disk: the same after a full study, a stopped one, or --report.
    results = [r for r in (read_result(out, run) for run in grid.runs()) if r is not None]
    note = "\n".join(f"- in progress: {line}" for line in unfinished(grid, out))
    write_csv(results, out / "results.csv")
    if args.epochs or batches or args.set:
        note += "\n\n" if note else ""
        note += (f"Reduced grid: {grid.epochs} epochs per run, batches {list(grid.batches)}"
                 + (f", --set {' '.join(args.set)}" if args.set else "")
                 + f" (the spec's own: `megabatch study --spec {args.spec}` without those flags).")
    write_markdown(grid, results, out / "report.md", note)
    written = plot(grid, results, out)
    print(f"wrote {out / 'results.csv'}, {out / 'report.md'}" + "".join(f", {p}" for p in written))
    if stopped is not None:
        raise stopped
    return 0


def _integers(text: str | None, flag: str) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r} must be comma-separated integers") from None


def cmd_noise_scale(args: argparse.Namespace) -> int:
    from megabatch.noise_command import run

    return run(args)


def cmd_simulate(args: argparse.Namespace) -> int:
    from megabatch.simulate.command import run

    return run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from megabatch.bench.command import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megabatch", description="Extremely large minibatch training (Akiba et al. 2017).")
    parser.add_argument("--version", action="version", version=f"megabatch {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def recipe_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--recipe", required=True, help="built-in recipe name or a .toml file")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe value, e.g. --set batch.global_batch=4096 (repeatable)")

    p = sub.add_parser("train", help="train a model with a recipe (also under torchrun, srun, mpirun)")
    p.add_argument("--recipe", help="built-in recipe name or a .toml file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set batch.global_batch=4096 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run from its newest complete checkpoint, mid-epoch included")
    p.add_argument("--data", help="folder with the data set (default: the recipe's, e.g. "
                                   "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", help="run directory (default: runs/<recipe>-<date>-<time>)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint: test top-1 and top-5")
    p.add_argument("--checkpoint", required=True, help="a checkpoint file (final.pt or step-*.pt)")
    p.add_argument("--data", help="folder with the data set (default: the recipe's)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: the recipe's")
    p.add_argument("--recompute-bn", type=int, nargs="?", const=0, metavar="IMAGES",
                   help="also evaluate with BN statistics recomputed from IMAGES training images (default: the "
                        "recipe's global batch) in the recipe's worker groups, as last-batch BN stores them: "
                        "tells the weights from the stored statistics")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("recipes", help="list the built-in recipes")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("schedule", help="print a recipe's learning rate and alpha_sgd as CSV")
    recipe_args(p)
    p.add_argument("--epochs", help="comma-separated epochs, e.g. 0,5,10.5")
    p.add_argument("--every", type=float, default=1.0, help="sample every K epochs (default 1)")
    p.add_argument("--plot", metavar="FILE.png", help="also draw lr and alpha_sgd against epochs")
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("study", help="accuracy against batch size: a grid of methods x batches x seeds")
    p.add_argument("--spec", required=True, help="built-in study spec or a .toml file")
    p.add_argument("--out", help="study folder (default runs/study-<spec>); finished runs are skipped")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--data", help="folder with the data set (default: the recipes')")
    p.add_argument("--epochs", type=int, help="a reduced grid: this epoch budget instead of the spec's")
    p.add_argument("--batches", help="a reduced grid: these batches (comma-separated) instead of the spec's")
    p.add_argument("--seeds", help="a reduced grid: only these seeds (comma-separated) of each cell")
    p.add_argument("--methods", help="a reduced grid: only these methods (comma-separated), e.g. to run "
                                     "them first; their runs are the full grid's")
    p.add_argument("--report", action="store_true",
                   help="only write results.csv, report.md and plots from the runs finished so far")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value in every run, after the spec's own (repeatable)")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("noise-scale", help="measure the gradient noise scale (the critical batch) of a recipe's model")
    from megabatch.noise_command import configure_parser as configure_noise

    configure_noise(p)
    p.set_defaults(func=cmd_noise_scale)

    p = sub.add_parser("simulate", help="predict time and scaling efficiency on a cluster")
    configure_simulate(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("bench", help="measure training (and input-pipeline) images/s here: ResNet-50, or the study model with --model small-cnn")
    configure_bench(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        _print_error(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        print("megabatch: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # Under several processes a crash is one line naming the rank (torchrun then
        # stops the others); alone, the traceback is the most useful report.
        if args.debug or not _rank_prefix():
            raise
        _print_error(f"{type(e).__name__}: {e} (rerun with --debug for the traceback)")
        return 1


def _rank_prefix() -> str:
    from megabatch.distributed import launch_environment

    try:
        info, _ = launch_environment()
    except UserError:
        return ""
    return f"rank {info.rank}/{info.world_size}: " if info.distributed else ""


def _print_error(message: str) -> None:
    first_line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    # One write, so that lines of several ranks sharing a terminal do not interleave.
    sys.stderr.write(f"megabatch: error: {_rank_prefix()}{first_line}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
