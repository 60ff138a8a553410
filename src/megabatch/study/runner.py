"""Running a study: every cell of the grid as its own ``megabatch train`` process.

Each run writes to ``OUT/runs/<method>/b<batch>-s<seed>/`` and is finished when
its ``result.json`` exists, so an interrupted study continues where it stopped: an
unfinished run resumes from its newest checkpoint (``megabatch train --resume``).
The first seed of every cell runs before any second seed, so a study cut short
still covers every cell; what a tuned cell calls for next starts as soon as its
tuning runs have finished: a factor beyond its edge (``widen_edges``), or, once it
has chosen, its confirmation seeds. ``--parallel N`` runs N at once (several small models share one GPU well; on a
CPU each gets cores / N threads). A diverged run is a result (the method failed
at that batch), not an error. Any other failure stops the study, and so does a
stop signal (SIGTERM, SIGUSR1): no new run starts, the runs in progress receive
SIGTERM, checkpoint their step and exit 75, and the study exits 75 after writing
its report; the same command continues it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from megabatch import metrics_log
from megabatch.errors import Preempted, UserError
from megabatch.signals import stop_on_signals
from megabatch.study.spec import Run, StudySpec
from megabatch.study.tuning import choices, planned_total


def run_dir(out: Path, run: Run) -> Path:
    return out / "runs" / run.key


def read_result(out: Path, run: Run) -> dict[str, Any] | None:
    path = run_dir(out, run) / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if "loss_curve" not in result:  # written before results held it: from the run's own metrics
        result["loss_curve"] = [m.get("train_loss") for m in read_metrics(run_dir(out, run))]
    return result


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    return metrics_log.read(folder / "metrics.jsonl")


def summarize(run: Run, folder: Path, diverged: bool, wall_time_s: float) -> dict[str, Any]:
    """One row of results.csv, from the run's metrics.jsonl and run.json."""
    metrics = read_metrics(folder)
    info = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    tested = [m["test_top1"] for m in metrics if "test_top1" in m]
    validated = [m["val_top1"] for m in metrics if "val_top1" in m]
    trained_s = sum(m["train_time_s"] for m in metrics)
    steps = metrics[-1]["iteration"] if metrics else 0
    return {
        "method": run.method.name, "recipe": run.method.recipe, "batch": run.batch,
        "workers": info.get("workers", run.batch // 32), "seed": run.seed, "lr_factor": run.lr_factor,
        "epochs": metrics[-1]["epoch"] if metrics else 0, "steps": steps,
        "final_top1": float("nan") if diverged or not tested else tested[-1],
        "best_top1": max(tested) if tested else float("nan"),
        # With data.validation_images: the held-out images' top-1, for choosing hyperparameters.
        "final_val_top1": float("nan") if diverged else validated[-1] if validated else None,
        # A resumed run's own clock (fit carries it over), not just this attempt's.
        "diverged": diverged, "wall_time_s": round(metrics[-1].get("wall_time_s", wall_time_s)
                                                   if metrics else wall_time_s, 1),
        "images_per_s": round(steps * run.batch / trained_s, 1) if trained_s else 0.0,
        "curve": [m.get("test_top1") for m in metrics],
        "loss_curve": [m.get("train_loss") for m in metrics],  # each epoch's mean training loss
    }


def first_seeds_first(grid: list[Run]) -> list[Run]:
    """``grid`` reordered so that the n-th seed of every cell runs before any (n+1)-th."""
    seen: dict[tuple[str, int], int] = {}
    rank = []
    for run in grid:
        cell = (run.method.name, run.batch, run.lr_factor)
        rank.append(seen.get(cell, 0))
        seen[cell] = rank[-1] + 1
    return [run for _, run in sorted(zip(rank, grid), key=lambda pair: pair[0])]


def unfinished(spec: StudySpec, out: Path) -> list[str]:
    """Where each started but unfinished run stands: "<key> at epoch E of N (top-1 T%)"."""
    lines = []
    for run in plan(spec, out)[0]:
        metrics = read_metrics(run_dir(out, run))
        if read_result(out, run) is None and metrics:
            last = metrics[-1]
            lines.append(f"{run.key} at epoch {last['epoch']} of {spec.epochs}"
                         + (f" (test top-1 {last['test_top1']:.2f}%)" if "test_top1" in last else ""))
    return lines


def resumable(folder: Path) -> bool:
    """Whether an unfinished run in ``folder`` has a checkpoint to continue from."""
    return (folder / "recipe.toml").is_file() and any((folder / "checkpoints").glob("step-*.pt"))


class Runs:
    """The ``megabatch train`` processes of a study: started one by one until
    :meth:`stop`, which also sends SIGTERM to every one still running, once: a second
    SIGTERM would find a trainer that had already checkpointed and restored the default
    handler, and kill it on its way out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self._signalled: set[subprocess.Popen] = set()
        self.stopped = False

    def run(self, cmd: list[str], log, env: dict[str, str]) -> int | None:
        """The exit status of ``cmd``, or None if the study was stopped before it started."""
        with self._lock:
            if self.stopped:
                return None
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
            self._running.add(proc)
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._running.discard(proc)
                self._signalled.discard(proc)

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            for proc in self._running - self._signalled:
                proc.send_signal(signal.SIGTERM)
                self._signalled.add(proc)


def execute(spec: StudySpec, run: Run, out: Path, data_dir: str | None, threads: int,
            runs: Runs | None = None) -> dict[str, Any] | None:
    """Train ``run`` (or resume it) to the end and write its ``result.json``; None if
    it was stopped first (SIGTERM: it checkpointed and exited 75) or never started."""
    runs = runs or Runs()
    folder = run_dir(out, run)
    log = folder.parent / f"{folder.name}.log"
    if runs.stopped:
        return None
    if resumable(folder):  # an interrupted earlier attempt: continue it
        cmd = [sys.executable, "-m", "megabatch", "train", "--resume", str(folder)]
    else:
        if folder.exists():  # interrupted before its first checkpoint: start again
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        log.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "megabatch", "train", "--recipe", run.method.recipe, "--out", str(folder)]
        for assignment in spec.overrides(run):
            cmd += ["--set", assignment]
    if data_dir:
        cmd += ["--data", data_dir]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with open(log, "a") as f:  # streamed, so a long run's progress can be followed
        returncode = runs.run(cmd, f, env)
    # Stopped: it checkpointed and exited 75, or our SIGTERM came before its handler was set.
    if returncode is None or returncode == Preempted.exit_code or (runs.stopped and returncode == -signal.SIGTERM):
        return None
    text = log.read_text()
    # Exit 1 is also Python's status for a crash: only the trainer's own line says "diverged".
    diverged = returncode == 1 and "megabatch: error: training diverged" in text
    if returncode != 0 and not diverged:
        last = (text.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"study run {run.key} failed ({last}); see {log}")
    result = summarize(run, folder, diverged=diverged, wall_time_s=time.perf_counter() - start)
    tmp = folder / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, folder / "result.json")  # the run counts as finished only now
    return result


def plan(spec: StudySpec, out: Path) -> tuple[list[Run], list[dict[str, Any]]]:
    """(every run of ``spec`` that the study calls for so far; the finished results of its
    methods' cells): the grid's, then the widenings and confirmations that the results on
    disk call for, and theirs. A cell chooses on all its tuning seeds, so the results are
    read for every seed, whichever seeds ``--seeds`` gave ``spec``."""
    every = replace(spec, only_seeds=())
    runs = every.runs()
    while True:
        results = [r for r in (read_result(out, run) for run in runs) if r is not None]
        chosen, widen = choices(every, results)
        more = [run for run in every.widenings(widen) + every.confirmations(chosen) if run not in runs]
        if not more:
            return [run for run in runs if selected(spec, run.seed)], results
        runs = runs + more


def selected(spec: StudySpec, seed: int) -> bool:
    return not spec.only_seeds or seed in spec.only_seeds


def next_runs(spec: StudySpec, out: Path, started: set[Run] = frozenset()) -> tuple[list[Run], list[dict[str, Any]]]:
    """(the unfinished runs not ``started`` yet, in the order they should start; the finished
    results, as :func:`plan` gives them): the grid's first seeds first, then what the results
    call for, the largest batches first and there each cell's lower seeds first."""
    known, results = plan(spec, out)
    grid = first_seeds_first(spec.runs())
    later = sorted(set(known) - set(grid), key=lambda run: (-run.batch, run.seed, known.index(run)))
    return [run for run in grid + later if run not in started and read_result(out, run) is None], results


def run_study(spec: StudySpec, out: Path, data_dir: str | None = None, parallel: int = 1,
              log: Callable[[str], None] = print) -> None:
    """Run every unfinished run of the study: the grid's, then what each cell calls for once
    its tuning runs have finished (a factor beyond its edge, its confirmations), which joins
    the queue behind the grid's runs then. Each time a run ends, the next to start is the
    first of those known then; each finished run's
    ``result.json`` is its result (the report reads them from disk, with :func:`read_result`)."""
    if parallel < 1:
        raise UserError(f"--parallel must be at least 1, got {parallel}")
    queue, results = next_runs(spec, out)
    done, total = sum(selected(spec, r["seed"]) for r in results), planned_total(spec, results)
    log(f"study {spec.name}: {total} runs ({done} already done in {out}), "
        f"{spec.epochs} epochs each, {parallel} at a time")
    threads = max(1, (os.cpu_count() or 1) // parallel)

    runs, counting = Runs(), threading.Lock()

    def one(run: Run) -> None:
        nonlocal done
        try:
            result = execute(spec, run, out, data_dir, threads, runs)
        except BaseException:
            runs.stop()  # one failure ends the study: the others checkpoint and stop
            raise
        if result is None:  # stopped: a signal, or a run that was itself told to stop
            runs.stop()
            return
        with counting:
            done += 1
        state = "diverged" if result["diverged"] else f"top-1 {result['final_top1']:.2f}%"
        log(f"[{done}/{total}] {run.key}: {state}, {result['steps']} steps, {result['wall_time_s']:.0f} s")

    with stop_on_signals(lambda number: runs.stop()), ThreadPoolExecutor(max_workers=parallel) as pool:
        started: set[Run] = set()
        pending: set[Future] = set()
        failed: list[BaseException] = []
        while True:
            while queue and len(pending) < parallel and not (failed or runs.stopped):
                started.add(queue[0])
                pending.add(pool.submit(one, queue.pop(0)))
            if not pending:
                break
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            failed += [e for e in (f.exception() for f in finished) if e is not None]
            if not (failed or runs.stopped):  # what the finished runs call for joins the queue
                try:
                    queue, results = next_runs(spec, out, started)
                    total = planned_total(spec, results)
                except BaseException as e:  # the runs in progress checkpoint and stop
                    runs.stop()
                    failed.append(e)
    if failed:
        raise failed[0]
    if runs.stopped:
        raise Preempted(f"study stopped with {done} of {total} runs finished; the runs in "
                        "progress checkpointed: run the same command again to continue")
    if done < total:  # --seeds named confirmation seeds of cells whose tuning runs have not all finished
        waiting = total - done
        log(f"{waiting} run{'s wait' if waiting > 1 else ' waits'} for their cells' tuning runs to finish: "
            f"run the tuning seeds first (without --seeds, or with "
            f"{','.join(map(str, sorted({s for seeds in spec.cell_seeds().values() for s in seeds})))})")
