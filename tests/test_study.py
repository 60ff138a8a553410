"""`megabatch study`: a tiny grid end to end, skipping finished runs, and the report."""

from __future__ import annotations

import csv
import json

import pytest

from megabatch.cli import main
from megabatch.errors import UserError
from megabatch.study import load_spec
from megabatch.study.report import largest_keeping_up

TINY = """
description = "tiny"
epochs = 1
batches = [256, 512]
seeds = [0]
set = ["data.train_subset=2048", "data.test_subset=500", "batch.micro_batch=256"]

[methods.linear]
recipe = "fashion-mnist-linear"

[methods.paper]
recipe = "fashion-mnist-paper"

[methods.paper-moving-average-bn]
recipe = "fashion-mnist-paper-moving-average-bn"
largest_only = true
ablation_of = "paper"
"""


def test_tiny_study_end_to_end_and_resumable(tmp_path, capsys, fashion_dir):
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY)
    out = tmp_path / "study"
    assert main(["study", "--spec", str(spec), "--out", str(out), "--parallel", "2"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["method"], r["batch"]) for r in rows] == [
        ("linear", "256"), ("linear", "512"), ("paper", "256"), ("paper", "512"), ("paper-moving-average-bn", "512")]
    for r in rows:
        assert r["epochs"] == "1" and int(r["steps"]) == 2048 // int(r["batch"])
        assert r["workers"] == str(int(r["batch"]) // 32)
        assert 10.0 < float(r["final_top1"]) <= 100.0 and float(r["images_per_s"]) > 0
    report = (out / "report.md").read_text()
    assert "| linear |" in report and "Largest batch at which each method stays within 1 point" in report
    for name in ("accuracy_vs_batch.png", "curves_largest_batch.png", "ablations.png"):
        assert (out / name).stat().st_size > 1000
    assert json.loads((out / "study.json").read_text())["runs"] == 5

    # An interrupted study continues: only the unfinished run is trained again.
    (out / "runs" / "paper" / "b256-s0" / "result.json").unlink()
    capsys.readouterr()
    assert main(["study", "--spec", str(spec), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "5 runs (4 already done" in printed and printed.count("] paper/b256-s0") == 1
    assert printed.count("] ") == 1


def test_spec_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.replace('recipe = "fashion-mnist-linear"', 'recipe = "fashion-mnist-linear"\nbatch = 3'))
    with pytest.raises(UserError, match="unknown study spec key methods.linear.batch"):
        load_spec(str(bad))
    bad.write_text(TINY.replace("fashion-mnist-linear", "nope"))
    with pytest.raises(UserError, match="unknown recipe 'nope'"):
        load_spec(str(bad))
    with pytest.raises(UserError, match="unknown study spec 'x'"):
        load_spec("x")


def test_builtin_spec_covers_the_methods_and_batches():
    spec = load_spec("fashion-mnist-batch-scaling")
    assert spec.epochs == 90 and min(spec.batches) <= 512 and max(spec.batches) >= 16384
    names = {m.name for m in spec.methods}
    assert {"baseline", "linear", "goyal", "lars", "paper", "paper-steps", "paper-no-rmsprop",
            "paper-goyal-schedule", "paper-moving-average-bn"} <= names
    largest = [r for r in spec.runs() if r.batch == 16384 and r.method.name == "paper"]
    assert len(largest) >= 2  # at least two seeds at the largest batch


def test_largest_batch_keeping_up_stops_at_the_first_failure():
    spec = load_spec("fashion-mnist-batch-scaling")
    results = [{"method": "linear", "batch": b, "final_top1": v}
               for b, v in ((512, 90.0), (2048, 89.5), (8192, 80.0), (16384, 89.8))]
    assert largest_keeping_up(spec, results, baseline=90.2)["linear"] == 2048
