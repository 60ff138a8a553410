"""The study runner (megabatch.study.runner): first seeds first, and a stop signal that
lets the runs in progress checkpoint, is sent to each run once, and is continued by the
same command."""

from __future__ import annotations

import csv

from megabatch.study.spec import load_spec


def test_first_seeds_run_first():
    from megabatch.study.runner import first_seeds_first

    order = [(r.method.name, r.batch, r.seed) for r in first_seeds_first(load_spec("fashion-mnist-paper-budget").runs())]
    assert [seed for *_, seed in order] == [0] * 13 + [1] * 9
    assert order[0] == ("baseline", 128, 0)


STOPPABLE = """
description = "two runs, one at a time"
epochs = 6
batches = [256, 512]
seeds = [0]
set = ["data.train_subset=1024", "data.test_subset=200", "batch.micro_batch=256", "train.device=cpu"]

[methods.linear]
recipe = "fashion-mnist-linear"
"""


def test_sigterm_stops_the_study_and_the_same_command_continues_it(tmp_path, fashion_dir):
    """SIGTERM to `megabatch study`: no new run starts, the run in progress checkpoints and
    stops, the report lists it, exit 75; the same command then finishes both runs."""
    import os
    import signal
    import subprocess
    import sys
    import time

    spec = tmp_path / "stoppable.toml"
    spec.write_text(STOPPABLE)
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "megabatch", "study", "--spec", str(spec), "--out", str(out),
           "--data", str(fashion_dir)]
    env = {**os.environ, "MEGABATCH_PLAIN_PROGRESS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = out / "runs" / "linear" / "b256-s0"
    deadline = time.monotonic() + 300
    while not ((first / "metrics.jsonl").is_file() and (first / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr
    assert "run the same command again to continue" in stderr.strip().splitlines()[-1]
    assert not (first / "result.json").exists() and any((first / "checkpoints").glob("step-*.pt"))
    assert not (out / "runs" / "linear" / "b512-s0").exists()  # never started
    assert "in progress: linear/b256-s0 at epoch" in (out / "report.md").read_text()

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["batch"], r["epochs"]) for r in rows] == [("256", "6"), ("512", "6")]
    assert "resum" in (out / "runs" / "linear" / "b256-s0.log").read_text().lower()


FAKE_TRAINER = """
import signal, sys, time
from pathlib import Path
log = Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda n, f: log.write_text(log.read_text() + "TERM\\n"))
log.write_text("ready\\n")
while "TERM" not in log.read_text():
    time.sleep(0.01)
signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as the trainer does once it has checkpointed
time.sleep(1.0)  # on its way out
sys.exit(75)
"""


def test_a_stopped_study_signals_each_run_once(tmp_path):
    """Every finished run calls stop() again; a second SIGTERM would kill a trainer that
    has already checkpointed and restored the default handler (exit -15: "failed")."""
    import sys
    import threading
    import time

    from megabatch.study.runner import Runs

    runs, codes, logs = Runs(), {}, [tmp_path / f"run{i}.log" for i in range(2)]
    script = tmp_path / "fake.py"
    script.write_text(FAKE_TRAINER)

    def start(log):
        with open(tmp_path / f"{log.stem}.out", "w") as out:
            codes[log.name] = runs.run([sys.executable, str(script), str(log)], out, {})

    threads = [threading.Thread(target=start, args=(log,)) for log in logs]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not all(log.is_file() and log.read_text() for log in logs):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    runs.stop()  # the study's SIGTERM
    while not all("TERM" in log.read_text() for log in logs):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.1)
    runs.stop()  # what the first run to return does
    for t in threads:
        t.join(timeout=60)
    assert codes == {"run0.log": 75, "run1.log": 75}
    assert [log.read_text().count("TERM") for log in logs] == [1, 1]
    assert runs.run([sys.executable, "-c", "pass"], None, {}) is None  # nothing starts once stopped


def _finished(out, run, val, test=None):
    """A run's result.json as the runner writes it, without training it."""
    import json

    from megabatch.study.runner import run_dir

    folder = run_dir(out, run)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(
        {"method": run.method.name, "batch": run.batch, "seed": run.seed, "lr_factor": run.lr_factor,
         "final_val_top1": val, "final_top1": val if test is None else test, "diverged": val is None,
         "loss_curve": []}))


WIDENED = """
description = "tuned, widened, confirmed"
epochs = 1
batches = [256, 512]
seeds = [0]
confirm_seeds = [1, 2]
widen_edges = 1
lr_factors = [1.0, 2.0]
set = ["data.train_subset=2048", "data.validation_images=512", "data.test_subset=500", "batch.micro_batch=256"]

[methods.paper]
recipe = "fashion-mnist-paper"
"""


def test_what_a_cell_calls_for_is_planned_from_the_results_on_disk(tmp_path):
    """The runner's queue: widenings and confirmations, largest batch and lower seeds first;
    a --seeds reduction still sees the tuning seed's results, so it confirms."""
    from megabatch.study.runner import next_runs

    path = tmp_path / "widened.toml"
    path.write_text(WIDENED)
    spec, out = load_spec(str(path)), tmp_path / "study"
    grid = {(r.batch, r.lr_factor): r for r in spec.runs()}
    assert [r.key for r in next_runs(spec, out)[0]] == [
        "paper/b256-s0", "paper/b256-s0-lr2", "paper/b512-s0", "paper/b512-s0-lr2"]
    _finished(out, grid[256, 1.0], 80.0)
    _finished(out, grid[256, 2.0], 70.0)  # x1 is best, at the lower edge: try x0.5
    _finished(out, grid[512, 1.0], 60.0)
    _finished(out, grid[512, 2.0], 65.0)  # x2 best: try x4
    queue, results = next_runs(spec, out)
    assert [r.key for r in queue] == ["paper/b512-s0-lr4", "paper/b256-s0-lr0.5"] and len(results) == 4
    _finished(out, queue[0], None, test=float("nan"))  # x4 diverged before its first evaluation
    _finished(out, queue[1], 79.0)  # x0.5 falls back: x1 stays
    assert [r.key for r in next_runs(spec, out)[0]] == [
        "paper/b512-s1-lr2", "paper/b512-s2-lr2", "paper/b256-s1", "paper/b256-s2"]
    only = load_spec(str(path), seeds=[2])
    assert [r.key for r in next_runs(only, out)[0]] == ["paper/b512-s2-lr2", "paper/b256-s2"]
