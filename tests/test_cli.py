"""The command line: listing, schedules, and one-line errors with exit status 2."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from megabatch import recipe as recipes
from megabatch.cli import main


def test_recipes_lists_every_builtin_with_its_description(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in recipes.builtin_names():
        line = next(l for l in out.splitlines() if l.startswith(name + " "))
        assert recipes.describe(name) in line


def test_schedule_prints_csv_at_the_given_epochs(capsys):
    assert main(["schedule", "--recipe", "paper-resnet50-imagenet-32k", "--epochs", "0,5,10.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "epoch,lr,alpha_sgd"
    rows = [tuple(map(float, l.split(","))) for l in lines[1:]]
    assert rows == [(0.0, 6.4, pytest.approx(0.5 * math.exp(-4), rel=1e-5)),
                    (5.0, 6.4, pytest.approx(0.5 * math.exp(-2), rel=1e-5)), (10.5, 6.4, 0.7)]


def test_schedule_every_and_plot(capsys, tmp_path):
    plot = tmp_path / "s.png"
    assert main(["schedule", "--recipe", "goyal-resnet50-imagenet-8k", "--every", "30", "--plot", str(plot)]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["0", "30", "60", "90"]
    assert rows[1] == "30,0.32,1"
    assert plot.stat().st_size > 1000


def test_python_dash_m_entry_point_and_debug_traceback():
    ok = subprocess.run([sys.executable, "-m", "megabatch", "recipes"], capture_output=True, text=True)
    assert ok.returncode == 0 and "fashion-mnist-demo" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "megabatch", "--debug", "train", "--recipe", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" in bad.stderr


def test_the_command_line_starts_without_torch():
    # Every command's parser is built at start; torch is imported when a command runs.
    code = "import sys; from megabatch.cli import build_parser; build_parser(); print(sorted(sys.modules))"
    modules = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'megabatch.bench.command'" in modules and "'torch'" not in modules


def test_a_reader_that_leaves_early_gets_no_traceback():
    # `megabatch schedule ... | head -1`: far more rows than a pipe holds, the reader gone after
    # one. The status is a pipe writer's that lost its reader (141), as for `yes | head`.
    cmd = [sys.executable, "-m", "megabatch", "schedule", "--recipe", "fashion-mnist-demo", "--every", "0.0002"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        assert p.stdout.readline() == "epoch,lr,alpha_sgd\n"
        p.stdout.close()
        assert p.wait() == 141 and p.stderr.read() == ""


def test_a_training_run_outlives_a_reader_that_leaves(tmp_path, fashion_dir):
    # `megabatch train ... | tee log` with tee gone: no data lost. The run stops printing,
    # finishes and writes its checkpoint; a warning says so once.
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megabatch", "train", "--recipe", "fashion-mnist-demo", "--out", str(out)]
    for value in ("data.train_subset=1024", "data.test_subset=256", "train.epochs=3", "batch.global_batch=256",
                  "train.precision=fp32", "train.device=cpu"):
        cmd += ["--set", value]
    env = {**os.environ, "MEGABATCH_PLAIN_PROGRESS": "1"}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as p:
        assert p.stdout.readline().startswith("recipe fashion-mnist-demo")
        p.stdout.close()
        assert p.wait() == 0
        warnings = [line for line in p.stderr.read().splitlines() if "the output is gone" in line]
    assert len(warnings) == 1 and (out / "final.pt").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_broken_pipe_that_is_not_stdouts_is_an_error(monkeypatch):
    from megabatch import schedule_command

    def lost_worker(args):
        raise BrokenPipeError(32, "Broken pipe")  # e.g. a data loader worker's pipe

    monkeypatch.setattr(schedule_command, "run", lost_worker)
    with pytest.raises(BrokenPipeError):
        main(["schedule", "--recipe", "fashion-mnist-demo"])


def test_schedule_shows_the_rescaling(capsys):
    assert main(["schedule", "--recipe", "paper-resnet50-imagenet-32k", "--set", "schedule.reference_epochs=90",
                 "--set", "train.epochs=9", "--epochs", "1.05,4"]) == 0
    captured = capsys.readouterr()
    assert "stretched x0.1 to 9 epochs: boundaries [4.0, 7.0, 8.5], alpha_sgd center 1 period 0.5" in captured.err
    assert captured.out.splitlines()[1:] == ["1.05,6.4,0.7", "4,0.96,1"]
