"""``megabatch study``: run a spec's grid (or the part of it that ``--methods`` and
``--seeds`` name), then write its report from the runs on disk: ``results.csv``,
``report.md`` and the plots, after a full study, a stopped one, or ``--report`` alone.
torch is imported inside :func:`run`, so that the command line starts without it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megabatch import flags


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--spec", required=True, help="built-in study spec or a .toml file")
    add("--out", help="study folder (default runs/study-<spec>); finished runs are skipped")
    add("--parallel", type=int, default=1, help="runs at once (default 1)")
    add("--data", help="folder with the data set (default: the recipes')")
    add("--epochs", type=int, help="a reduced grid: this epoch budget instead of the spec's")
    add("--batches", help="a reduced grid: these batches (comma-separated) instead of the spec's")
    add("--seeds", help="a reduced grid: only these seeds (comma-separated) of each cell")
    add("--methods", help="a reduced grid: only these methods (comma-separated), e.g. to run "
                          "them first; their runs are the full grid's")
    add("--report", action="store_true",
        help="only write results.csv, report.md and plots from the runs finished so far")
    add("--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe value in every run, after the spec's own (repeatable)")


def run(args: argparse.Namespace) -> int:
    import torch

    from megabatch import provenance
    from megabatch.errors import Preempted
    from megabatch.study.report import plot, write_csv, write_markdown
    from megabatch.study.runner import plan, run_study, unfinished
    from megabatch.study.spec import load_spec

    batches = flags.numbers(args.batches, "--batches", int, "2048,8192") if args.batches else None
    seeds = flags.numbers(args.seeds, "--seeds", int, "0,1,2") if args.seeds else None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    spec = load_spec(args.spec, epochs=args.epochs, batches=batches, seeds=seeds, extra_set=args.set,
                     methods=methods)
    out = Path(args.out) if args.out else Path("runs") / f"study-{spec.name}"
    out.mkdir(parents=True, exist_ok=True)
    # --methods and --seeds run some of the grid's own runs: the folder, its provenance and
    # its report stay those of the whole grid. --epochs, --batches and --set make another grid.
    grid = spec.whole()
    stopped = None
    if not args.report:  # the provenance of the runs, not of a later report
        (out / "study.json").write_text(json.dumps(
            {**provenance.collect(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
             "spec": args.spec, "epochs": grid.epochs, "batches": list(grid.batches),
             "runs": grid.total()}
            | ({"this_invocation": {"methods": methods, "seeds": seeds, "runs": spec.total()}}
               if methods or seeds else {}), indent=2) + "\n")
        try:
            run_study(spec, out, args.data, args.parallel)
        except Preempted as e:  # the report of what finished is still written
            stopped = e
    # The report reads the runs from disk: the same after a full study, a stopped one, or --report.
    _, results = plan(grid, out)
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
