"""What a study writes: results.csv, report.md and its plots."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from megabatch.study.spec import StudySpec
from megabatch.study.tuning import choices, factor_of, mean_spread, planned_total, tuned, tuning_rows, validation

COLUMNS = ["method", "recipe", "batch", "workers", "seed", "lr_factor", "epochs", "steps", "final_top1", "best_top1",
           "diverged", "wall_time_s", "images_per_s", "final_val_top1", "final_train_loss", "loss_spikes"]
TOLERANCE = 1.0  # points of top-1 below the small-batch baseline that still count as "keeps up"
SPIKE = 1.3  # an epoch whose mean training loss is 30% above the epoch before's is a loss spike


def write_csv(results: Sequence[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "lr_factor": factor_of(r), "final_train_loss": final_loss(r),
                          "loss_spikes": len(loss_spikes(r.get("loss_curve", [])))} for r in results)


def loss_spikes(curve: Sequence[float | None]) -> list[int]:
    """The epochs (from 1) whose mean training loss rose more than SPIKE-fold over the epoch
    before: where a large learning rate threw the run back."""
    return [e + 2 for e, (a, b) in enumerate(zip(curve, curve[1:]))
            if a is not None and b is not None and b > SPIKE * a]


def final_loss(row: dict[str, Any]) -> float | None:
    curve = row.get("loss_curve") or [None]
    return None if curve[-1] is None else round(curve[-1], 4)


def cells(results: Sequence[dict[str, Any]]) -> dict[tuple[str, int], list[float]]:
    """Final top-1 of each (method, batch) over seeds; a diverged run counts as NaN."""
    grouped: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in results:
        grouped[r["method"], r["batch"]].append(r["final_top1"])
    return grouped


def tuning_lines(spec: StudySpec, results: Sequence[dict[str, Any]], chosen: dict[tuple[str, int], float]) -> list[str]:
    """A table of every cell at every factor it tried: validation / test top-1 (mean over the
    tuning seeds, which chose; the confirmation seeds are in the cells' own row)."""
    rows = tuning_rows(spec, results)
    tried = {(m.name, b): sorted(set(spec.factors(m)) | set(rows.get((m.name, b), ()))) for m, b in spec.cells()}
    _, widen = choices(spec, results)
    factors = sorted({f for fs in tried.values() for f in fs} | set(widen.values()))
    seeds = ("the finished tuning seeds, which chose; the confirmation seeds are in the first table"
             if spec.confirm_seeds else "finished seeds")
    lines = ["", "Learning-rate tuning: validation / test top-1 (%) at each multiple of the recipe's "
             f"lr_per_256 (mean over {seeds}); the chosen factor, by validation, in bold.", "",
             "| method | batch | " + " | ".join(f"x{f:g}" for f in factors) + " |",
             "| --- | --- |" + " --- |" * len(factors)]
    for cell, cell_factors in tried.items():
        texts = []
        for f in factors:
            runs = rows.get(cell, {}).get(f)
            if f not in cell_factors and f != widen.get(cell):
                texts.append("")
            elif not runs:
                texts.append("missing")
            else:
                val, _ = mean_spread([validation(r) for r in runs])
                test, _ = mean_spread([r["final_top1"] for r in runs])
                text = "diverged" if math.isnan(test) else f"{val:.2f} / {test:.2f}"
                texts.append(f"**{text}**" if chosen.get(cell) == f else text)
        lines.append(f"| {cell[0]} | {cell[1]:,} | " + " | ".join(texts) + " |")
    if spec.widen_edges:
        lines += ["", f"A cell whose best factor was the largest or smallest it had tried tried the next one "
                      f"beyond (up to {spec.widen_edges} more) before choosing; one whose every factor "
                      f"diverged, the next one below the smallest."]
    edges = [f"{name} at {batch:,} (x{factor:g})" for (name, batch), factor in chosen.items()
             if len(tried.get((name, batch), ())) > 1 and factor in (tried[name, batch][0], tried[name, batch][-1])
             and not math.isnan(mean_spread([validation(r) for r in rows[name, batch][factor]])[0])]
    if edges:  # a best value at the edge of the search says the search was too narrow there
        lines += ["", "Chosen at the edge of the factors tried, so a rate beyond it might do better: "
                  + ", ".join(edges) + "."]
    diverged = [f"{name} at {batch:,}" for (name, batch), factor in chosen.items()
                if math.isnan(mean_spread([validation(r) for r in rows[name, batch][factor]])[0])]
    if diverged:
        lines += ["", "Every factor tried diverged, so a smaller rate might train: " + ", ".join(diverged) + "."]
    return lines


def largest_keeping_up(spec: StudySpec, results: Sequence[dict[str, Any]],
                       baseline: float) -> dict[str, tuple[int | None, int | None]]:
    """Per method, (the largest batch whose mean final top-1 is within TOLERANCE of the
    baseline, the first planned batch not finished yet): walking up the method's planned
    batches, the walk stops at the first that falls short or has no finished run. With
    nothing unfinished in the way, the answer is settled."""
    table = cells(results)
    planned: dict[str, set[int]] = defaultdict(set)
    for method, batch in spec.planned():
        planned[method].add(batch)
    answer: dict[str, tuple[int | None, int | None]] = {}
    for method in spec.methods:
        best, pending = None, None
        for batch in sorted(planned[method.name]):
            if (method.name, batch) not in table:
                pending = batch
                break
            mean, _ = mean_spread(table[method.name, batch])
            if math.isnan(mean) or mean < baseline - TOLERANCE:
                break
            best = batch
        answer[method.name] = (best, pending)
    return answer


def keeping_up_line(best: int | None, pending: int | None) -> str:
    if pending is None:
        return f"{best:,}" if best else "none of the tested batches"
    return (f"at least {best:,}" if best else "not known yet") + f" ({pending:,} not finished)"


def stability_lines(spec: StudySpec, results: Sequence[dict[str, Any]]) -> list[str]:
    """Every finished run at the largest batch: its final training loss, test top-1 and loss
    spikes, which tell a run that trained badly from one that generalized badly."""
    largest = max(spec.batches)
    runs = [r for r in results if r["batch"] == largest and r.get("loss_curve")]
    if not runs:
        return []
    lines = ["", f"Training at {largest:,}: each run's final training loss (the last epoch's mean) and the epochs "
                 f"whose mean training loss rose more than {SPIKE:g}-fold over the epoch before (loss spikes).", "",
             "| run | final training loss | final test top-1 | loss spikes at epochs |", "| --- | --- | --- | --- |"]
    order = {m.name: i for i, m in enumerate(spec.methods)}
    for r in sorted(runs, key=lambda r: (order.get(r["method"], len(order)), factor_of(r), r["seed"])):
        loss, spikes = final_loss(r), loss_spikes(r["loss_curve"])
        name = f"{r['method']} s{r['seed']}" + (f" lr x{factor_of(r):g}" if factor_of(r) != 1.0 else "")
        top1 = "diverged" if r.get("diverged") else f"{r['final_top1']:.2f}"
        lines.append(f"| {name} | {'n/a' if loss is None else f'{loss:.3f}'} | {top1} | "
                     f"{', '.join(map(str, spikes)) or 'none'} |")
    return lines


def write_markdown(spec: StudySpec, results: Sequence[dict[str, Any]], path: Path, note: str = "") -> None:
    every, (results, chosen) = results, tuned(spec, results)
    table = cells(results)
    batches = sorted({b for _, b in table})
    baseline_method = spec.methods[0].name
    base_values = [v for (m, _), vs in table.items() if m == baseline_method for v in vs]
    baseline, _ = mean_spread(base_values)
    planned = spec.planned()
    batches = sorted({b for _, b in planned} | set(batches))
    total = planned_total(spec, every)
    tuning = tuning_rows(spec, every)  # a tuned cell with some of these has started choosing
    missing = total - len(every)
    chosen_note = (" Each cell at the learning-rate factor its validation top-1 chose (lr xF), with the "
                   "test top-1 of that factor's runs" + (
                       f", confirmation seeds {', '.join(map(str, spec.confirm_seeds))} included (they run "
                       "once the cell has chosen)." if spec.confirm_seeds else ".") if spec.tuning else "")
    lines = [f"# Study {spec.name}", "", spec.description, "",
             f"{len(every)} runs, {spec.epochs} epochs each. Final test top-1 (%), mean ± standard "
             f"deviation over seeds (n); \"diverged\" = the loss became NaN or infinite.{chosen_note}", ""]
    if missing > 0:
        lines += [f"**Partial: {missing} of the {total} planned runs have not finished yet.** "
                  "\"missing\" marks a cell with no finished run" + (
                      ", \"choosing\" a tuned cell whose learning-rate factor is not chosen yet"
                      if spec.tuning else "") + "; (n of m) a cell with fewer seeds than "
                  "planned. `megabatch study` with the same --out continues the study.", ""]
    if note:
        lines += [note, ""]
    lines += ["| method | " + " | ".join(f"{b:,}" for b in batches) + " |",
              "| --- |" + " --- |" * len(batches)]
    for method in spec.methods:
        row = []
        for batch in batches:
            values, wanted = table.get((method.name, batch)), planned.get((method.name, batch), 0)
            if not values:
                row.append("" if not wanted else "choosing" if (method.name, batch) in tuning else "missing")
                continue
            mean, spread = mean_spread(values)
            count = f"{len(values)}" if len(values) >= wanted else f"{len(values)} of {wanted}"
            if (method.name, batch) in chosen:
                count += f", lr x{chosen[method.name, batch]:g}"
            shown = f"{mean:.2f}" + (f" ± {spread:.2f}" if len(values) > 1 else "")  # one seed: no spread
            row.append("diverged" if math.isnan(mean) else f"{shown} ({count})")
        lines.append(f"| {method.name} | " + " | ".join(row) + " |")
    if math.isnan(baseline):
        lines += ["", f"Small-batch reference ({baseline_method}): not finished yet, so no method is "
                      f"compared with it."]
    else:
        lines += ["", f"Small-batch reference ({baseline_method}): {baseline:.2f}%. Largest batch at which each "
                  f"method stays within {TOLERANCE:g} point of it:", ""]
        for name, (best, pending) in largest_keeping_up(spec, results, baseline).items():
            if name != baseline_method:
                lines.append(f"- {name}: {keeping_up_line(best, pending)}")
    if spec.tuning:
        lines += tuning_lines(spec, every, chosen)
    lines += stability_lines(spec, every)
    lines += ["", "Per run: `results.csv`; plots: `accuracy_vs_batch.png`, `curves_largest_batch.png`, "
              "`ablations.png`.", ""]
    path.write_text("\n".join(lines))


def plot(spec: StudySpec, results: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    from megabatch.plots import pyplot

    plt = pyplot()
    results, _ = tuned(spec, results)  # with tuning, each cell at its chosen learning rate
    table = cells(results)
    written = []
    if not results:
        return written
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in spec.methods:
        if method.ablation_of:
            continue
        points = sorted((b, mean_spread(v)) for (m, b), v in table.items() if m == method.name)
        if points:
            ax.errorbar([b for b, _ in points], [ms[0] for _, ms in points], yerr=[ms[1] for _, ms in points],
                        marker="o", capsize=3, label=method.name)
    ax.set(xscale="log", xlabel="global batch", ylabel="final test top-1 (%)", title=spec.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_batch.png", dpi=100)
    written.append(out / "accuracy_vs_batch.png")
    plt.close(fig)

    largest = max(spec.batches)  # the spec's: the curves and ablations wait for its runs
    at_largest = [r for r in results if r["batch"] == largest]
    if not at_largest:
        return written
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in at_largest:
        if r["seed"] == min(x["seed"] for x in at_largest):
            curve = [c if c is not None else float("nan") for c in r["curve"]]
            per_epoch = r["steps"] / max(r["epochs"], 1)
            ax.plot([per_epoch * e for e in range(1, len(curve) + 1)], curve, marker=".", markersize=3,
                    label=r["method"])
    ax.set(xlabel="optimizer steps", ylabel="test top-1 (%)", title=f"every method at batch {largest:,}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves_largest_batch.png", dpi=100)
    written.append(out / "curves_largest_batch.png")
    plt.close(fig)

    ablated = [m for m in spec.methods if m.ablation_of and (m.name, largest) in table]
    if ablated:
        names = list(dict.fromkeys([m.ablation_of for m in ablated] + [m.name for m in ablated]))
        values = [mean_spread(table[n, largest]) if (n, largest) in table else None for n in names]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        known = [v is not None and not math.isnan(v[0]) for v in values]
        ax.bar(range(len(names)), [v[0] if ok else 0 for v, ok in zip(values, known)],
               yerr=[v[1] if ok else 0 for v, ok in zip(values, known)], capsize=3)
        for i, (v, ok) in enumerate(zip(values, known)):
            ax.text(i, (v[0] if ok else 0) + 0.5, f"{v[0]:.1f}" if ok else "not run" if v is None else "diverged",
                    ha="center")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set(ylabel="final test top-1 (%)", title=f"ablations at batch {largest:,}")
        fig.tight_layout()
        fig.savefig(out / "ablations.png", dpi=100)
        written.append(out / "ablations.png")
        plt.close(fig)
    return written
