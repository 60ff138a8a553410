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
