"""`megabatch study`: a tiny grid end to end, skipping finished runs, and the report."""

from __future__ import annotations

import csv
import math
import json

import pytest

from megabatch.cli import main
from megabatch.errors import UserError
from megabatch.study.spec import load_spec
from megabatch.study.report import largest_keeping_up, loss_spikes

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
    assert "| run | final training loss | final test top-1 | loss spikes at epochs |" in report
    assert "| paper-moving-average-bn s0 | " in report  # the largest batch's runs, ablations included

    # A result written before results held the training loss reads it from the run's metrics.
    done = out / "runs" / "linear" / "b512-s0"
    result = json.loads((done / "result.json").read_text())
    last_loss = json.loads((done / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"]
    assert result["loss_curve"] == [last_loss]
    del result["loss_curve"]
    (done / "result.json").write_text(json.dumps(result))
    assert main(["study", "--spec", str(spec), "--out", str(out), "--report"]) == 0
    row = next(r for r in csv.DictReader((out / "results.csv").open()) if r["method"] == "linear" and r["batch"] == "512")
    assert float(row["final_train_loss"]) == round(last_loss, 4) and row["loss_spikes"] == "0"

    # An interrupted study continues: only the unfinished run is trained again.
    (out / "runs" / "paper" / "b256-s0" / "result.json").unlink()
    assert main(["study", "--spec", str(spec), "--out", str(out), "--report"]) == 0  # trains nothing
    partial = (out / "report.md").read_text()
    assert "Partial: 1 of the 5 planned runs" in partial and "| paper | missing |" in partial
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
    for edit, message in [(("epochs = 1", "epochs = 0"), "study spec key epochs must be >= 1, got 0"),
                          (("[256, 512]", "[256, -512]"), r"study spec key batches\[1\] must be >= 1, got -512"),
                          (('recipe = "fashion-mnist-paper"\n', ""), r"study spec table \[methods.paper\] needs recipe"),
                          (("largest_only = true", "largest_only = 1"), "methods.paper-moving-average-bn.largest_only "
                                                                        "must be bool, got 1")]:
        bad.write_text(TINY.replace(*edit))
        with pytest.raises(UserError, match=message):
            load_spec(str(bad))
    bad.write_text("batches = [256]\nmethods = 3\n")
    with pytest.raises(UserError, match="study spec key methods must be tables"):
        load_spec(str(bad))
    bad.write_text(TINY)
    for flags, message in [({"seeds": [7]}, "--seeds 7: no run of study spec .* has these seeds; its seeds: 0"),
                           ({"epochs": 0}, "--epochs 0: give a positive number"),
                           ({"batches": [256, 0]}, "--batches 256,0: give positive global batches")]:
        with pytest.raises(UserError, match=message):
            load_spec(str(bad), **flags)
    good = tmp_path / "tiny.toml"
    good.write_text(TINY)
    with pytest.raises(UserError, match="--methods: lasso not in study spec"):
        load_spec(str(good), methods=["paper", "lasso"])


def test_methods_keep_those_methods_runs_of_the_full_grid(tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY)
    full = load_spec(str(spec))
    some = load_spec(str(spec), methods=["paper-moving-average-bn", "linear"])
    assert [r.key for r in some.runs()] == ["linear/b256-s0", "linear/b512-s0", "paper-moving-average-bn/b512-s0"]
    assert all(some.overrides(r) == full.overrides(r) for r in some.runs())


def test_builtin_spec_covers_the_methods_and_batches():
    spec = load_spec("fashion-mnist-batch-scaling")
    assert spec.epochs == 90 and min(spec.batches) <= 512 and max(spec.batches) >= 16384
    names = {m.name for m in spec.methods}
    assert {"baseline", "linear", "goyal", "lars", "paper", "paper-steps", "paper-no-rmsprop",
            "paper-goyal-schedule", "paper-moving-average-bn"} <= names
    largest = [r for r in spec.runs() if r.batch == 16384 and r.method.name == "paper"]
    assert len(largest) >= 2  # at least two seeds at the largest batch


def test_builtin_tuned_spec_tunes_every_main_method_on_held_out_images():
    spec = load_spec("fashion-mnist-paper-budget-tuned")
    assert spec.tuning and "data.validation_images=6000" in spec.set and len(spec.runs()) == 27
    assert spec.confirm_seeds == (1, 2) and spec.widen_edges == 2 and spec.total() == 27 + 9 * 2
    cells = {(r.method.name, r.batch) for r in spec.runs()}
    assert cells == {("baseline", 128)} | {(m, b) for m in ("linear", "goyal", "lars", "paper") for b in (2048, 8192)}
    assert {r.lr_factor for r in spec.runs()} == {0.5, 1.0, 2.0}


def test_largest_batch_keeping_up_stops_at_the_first_failure():
    spec = load_spec("fashion-mnist-batch-scaling")
    results = [{"method": "linear", "batch": b, "final_top1": v}
               for b, v in ((512, 90.0), (2048, 89.5), (8192, 80.0), (16384, 89.8))]
    assert largest_keeping_up(spec, results, baseline=90.2)["linear"] == (2048, None)


def test_unfinished_batches_leave_the_largest_batch_open():
    """A cell not finished yet is not a failure: the answer says what it waits for."""
    from megabatch.study.report import keeping_up_line

    spec = load_spec("fashion-mnist-paper-budget")
    results = [{"method": "baseline", "batch": 128, "final_top1": 92.1},
               {"method": "linear", "batch": 2048, "final_top1": 92.2},
               {"method": "goyal", "batch": 2048, "final_top1": 80.0}]
    answer = largest_keeping_up(spec, results, baseline=92.1)
    assert answer["linear"] == (2048, 8192) and answer["goyal"] == (None, None) and answer["lars"] == (None, 2048)
    assert [keeping_up_line(*answer[m]) for m in ("linear", "goyal", "lars")] == [
        "at least 2,048 (8,192 not finished)", "none of the tested batches", "not known yet (2,048 not finished)"]


def test_paper_budget_spec_grid():
    spec = load_spec("fashion-mnist-paper-budget")
    assert spec.epochs == 90 and spec.batches == (2048, 8192) and "train.precision=fp32" in spec.set
    cells = {(r.method.name, r.batch): [] for r in spec.runs()}
    for r in spec.runs():
        cells[(r.method.name, r.batch)].append(r.seed)
    for method in ("linear", "goyal", "lars", "paper"):
        assert cells[(method, 2048)] == cells[(method, 8192)] == [0, 1]
    for ablation in ("paper-no-rmsprop", "paper-goyal-schedule", "paper-moving-average-bn", "paper-steps"):
        assert cells[(ablation, 8192)] == [0] and (ablation, 2048) not in cells
    assert cells[("baseline", 128)] == [0, 1] and len(spec.runs()) == 22
    # LARS runs the published trust ratio with the MLPerf hyperparameters, scaled to the batch.
    from megabatch import recipe as recipes
    lars = recipes.load("fashion-mnist-lars", list(spec.overrides(next(r for r in spec.runs() if r.method.name == "lars"))))
    assert lars.optimizer.trust_norm == "gradient_plus_decay" and lars.base_lr == pytest.approx(29.0 * 2048 / 32768)


def test_loss_spikes_are_epochs_whose_loss_rose_more_than_thirty_percent():
    assert loss_spikes([2.0, 1.0, 1.3, 1.31, 0.5, 0.66, None, 5.0]) == [6]  # 1.3 is not above 1.3 x 1.0
    assert loss_spikes([1.0, 1.31, 2.0]) == [2, 3] and loss_spikes([]) == [] and loss_spikes([0.4]) == []


def test_paper_budget_spec_in_tiny_form(tmp_path, fashion_dir):
    """The built-in spec end to end, one epoch on a subset (at most 2 steps) and one seed:
    every cell of the grid trains and reports."""
    out = tmp_path / "study"
    assert main(["study", "--spec", "fashion-mnist-paper-budget", "--out", str(out), "--epochs", "1",
                 "--seeds", "0", "--parallel", "2", "--data", str(fashion_dir),
                 "--set", "data.train_subset=8192", "--set", "data.test_subset=500",
                 "--set", "train.max_steps=2"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 13 and all(r["epochs"] == "1" for r in rows)
    assert {(r["batch"], int(r["steps"])) for r in rows} == {("128", 2), ("2048", 2), ("8192", 1)}
    assert "Reduced grid" in (out / "report.md").read_text()


def test_report_of_a_study_with_nothing_finished_marks_every_cell_missing(tmp_path):
    from megabatch.study.report import write_markdown

    spec = load_spec("fashion-mnist-paper-budget")
    write_markdown(spec, [], tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text()
    assert "Partial: 22 of the 22 planned runs have not finished yet" in report
    assert "| baseline | missing |  |  |" in report and "| linear |  | missing | missing |" in report
    assert "not finished yet, so no method is compared" in report
    finished = [{"method": "baseline", "batch": 128, "final_top1": 92.14, "seed": 0},
                {"method": "linear", "batch": 2048, "final_top1": 92.24, "seed": 0}]
    write_markdown(spec, finished, tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text()
    assert "| baseline | 92.14 (1 of 2) |  |  |" in report  # one seed: no standard deviation
    assert "- linear: at least 2,048 (8,192 not finished)" in report
    from megabatch.study.report import plot

    finished = [{**r, "steps": 10, "epochs": 1, "curve": [r["final_top1"]]} for r in finished]
    written = plot(spec, finished, tmp_path)  # nothing at 8,192 yet: no curves or ablations there
    assert [p.name for p in written] == ["accuracy_vs_batch.png"]


def test_a_study_of_some_methods_reports_the_whole_grid(tmp_path, fashion_dir):
    """--methods runs some of the grid's own runs: the report and study.json stay the whole
    grid's (the other cells "missing", no "Reduced grid"), and this invocation is recorded."""
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY)
    out = tmp_path / "study"
    assert main(["study", "--spec", str(spec), "--out", str(out), "--methods", "linear",
                 "--data", str(fashion_dir)]) == 0
    report = (out / "report.md").read_text()
    assert "Reduced grid" not in report and "Partial: 3 of the 5 planned runs" in report
    assert "| paper | missing | missing |" in report and "| paper-moving-average-bn |  | missing |" in report
    info = json.loads((out / "study.json").read_text())
    assert info["runs"] == 5 and info["this_invocation"] == {"methods": ["linear"], "seeds": None, "runs": 2}
    assert "cpu" in info


TUNED = """
description = "tuning"
epochs = 1
batches = [256]
seeds = [0]
lr_factors = [0.5, 1.0, 2.0]
set = ["data.train_subset=2048", "data.validation_images=512", "data.test_subset=500", "batch.micro_batch=256",
       "train.max_steps=2"]

[methods.linear]
recipe = "fashion-mnist-linear"

[methods.paper]
recipe = "fashion-mnist-paper"
lr_factors = [1.0, 2.0]
"""


def test_lr_factors_multiply_each_recipes_own_rate_and_need_a_validation_split(tmp_path):
    from megabatch import recipe as recipes

    path = tmp_path / "tuned.toml"
    path.write_text(TUNED)
    spec = load_spec(str(path))
    assert [r.key for r in spec.runs()] == ["linear/b256-s0-lr0.5", "linear/b256-s0", "linear/b256-s0-lr2",
                                            "paper/b256-s0", "paper/b256-s0-lr2"]
    assert spec.planned() == {("linear", 256): 1, ("paper", 256): 1}  # seeds per cell, not factors
    for run in spec.runs():
        tuned = recipes.load(run.method.recipe, spec.overrides(run)).optimizer.lr_per_256
        default = recipes.load(run.method.recipe).optimizer.lr_per_256
        assert tuned == pytest.approx(default * run.lr_factor, rel=1e-15)
    path.write_text(TUNED.replace('"data.validation_images=512", ', ""))
    with pytest.raises(UserError, match="method linear tunes lr_factors but holds out no validation images"):
        load_spec(str(path))
    path.write_text(TUNED.replace("data.validation_images=512", "data.validation_images=2048"))
    with pytest.raises(UserError, match="linear/b256-s0-lr0.5 has 0 training images after data.validation_images "
                                        "= 2048, fewer than its global batch 256"):
        load_spec(str(path))
    path.write_text(TUNED.replace("[0.5, 1.0, 2.0]", "[0.5, -1.0]"))
    with pytest.raises(UserError, match=r"study spec key lr_factors\[1\] must be > 0, got -1.0"):
        load_spec(str(path))


def test_each_cell_reports_the_test_top1_of_the_factor_validation_chose(tmp_path):
    from megabatch.study.report import tuned, write_markdown

    path = tmp_path / "tuned.toml"
    path.write_text(TUNED)
    spec = load_spec(str(path))

    def row(method, factor, val, test):
        return {"method": method, "batch": 256, "seed": 0, "lr_factor": factor, "final_val_top1": val,
                "final_top1": test}

    results = [row("linear", 0.5, 80.0, 85.0), row("linear", 1.0, 82.0, 81.0),  # the best test is not chosen
               row("linear", 2.0, float("nan"), float("nan")),  # diverged
               row("paper", 1.0, 70.0, 71.0)]  # its x2 has not finished: no choice yet
    rows, chosen = tuned(spec, results)
    assert chosen == {("linear", 256): 1.0} and rows == [results[1]]
    tie = [row("linear", 0.5, 82.0, 85.0), *results[1:]]
    assert tuned(spec, tie)[1] == {("linear", 256): 1.0}  # a tie goes to the recipe's own rate
    write_markdown(spec, results, tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text()
    assert "| linear | 81.00 (1, lr x1) |" in report and "| paper | choosing |" in report  # its x2 runs still
    assert "| linear | 256 | 80.00 / 85.00 | **82.00 / 81.00** | diverged |" in report
    assert "| paper | 256 |  | 70.00 / 71.00 | missing |" in report
    assert "Partial: 1 of the 5 planned runs" in report


def test_a_tuned_study_end_to_end(tmp_path, fashion_dir):
    path = tmp_path / "tuned.toml"
    path.write_text(TUNED)
    out = tmp_path / "study"
    assert main(["study", "--spec", str(path), "--out", str(out), "--methods", "paper", "--parallel", "2",
                 "--data", str(fashion_dir)]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["lr_factor"], float(r["final_val_top1"]) > 0) for r in rows] == [("1.0", True), ("2.0", True)]
    lrs = [json.loads((out / "runs" / "paper" / key / "run.json").read_text())["base_lr"]
           for key in ("b256-s0", "b256-s0-lr2")]
    assert lrs[1] == pytest.approx(2 * lrs[0])
    assert "**" in (out / "report.md").read_text()  # paper's cell has chosen its factor


CONFIRMED = TUNED.replace("seeds = [0]\n", "seeds = [0]\nconfirm_seeds = [1, 2]\n")


def test_confirm_seeds_rerun_the_chosen_factor_largest_batches_first(tmp_path):
    path = tmp_path / "confirmed.toml"
    path.write_text(CONFIRMED.replace("batches = [256]", "batches = [256, 512]"))
    spec = load_spec(str(path))
    assert len(spec.runs()) == 10 and spec.total() == 10 + 4 * 2  # 4 cells, each 2 more seeds
    assert spec.planned()["linear", 512] == 3
    confirm = spec.confirmations({("linear", 256): 0.5, ("linear", 512): 1.0, ("paper", 512): 2.0})
    assert [r.key for r in confirm] == ["linear/b512-s1", "paper/b512-s1-lr2", "linear/b512-s2", "paper/b512-s2-lr2",
                                        "linear/b256-s1-lr0.5", "linear/b256-s2-lr0.5"]
    assert [r.key for r in spec.widenings({("linear", 256): 4.0, ("paper", 512): 0.5})] == [
        "paper/b512-s0-lr0.5", "linear/b256-s0-lr4"]
    only = load_spec(str(path), seeds=[2])  # a reduction to a confirmation seed alone
    assert only.runs() == [] and [r.key for r in only.confirmations({("linear", 256): 1.0})] == ["linear/b256-s2"]
    assert only.total() == 4


@pytest.mark.parametrize("change, message", [
    (("lr_factors = [0.5, 1.0, 2.0]\n", ""), "confirm_seeds rerun the learning-rate factor that tuning chose, but "
                                             "the spec tunes nothing"),
    (("confirm_seeds = [1, 2]\nlr_factors = [0.5, 1.0, 2.0]\n", "widen_edges = 1\n"),
     "widen_edges tries learning-rate factors beyond the best of lr_factors, but the spec tunes nothing"),
    (("confirm_seeds = [1, 2]", "widen_edges = -1"), "widen_edges must be >= 0, got -1"),
    (("confirm_seeds = [1, 2]", "confirm_seeds = [2, 0]"), "seed 0 is both a tuning seed and in confirm_seeds"),
    (("confirm_seeds = [1, 2]", "confirm_seeds = [-1]"), r"confirm_seeds\[0\] must be >= 0, got -1"),
])
def test_confirm_seeds_errors_are_one_line(tmp_path, change, message):
    path = tmp_path / "confirmed.toml"
    text = CONFIRMED.replace(*change)
    path.write_text(text.replace("lr_factors = [1.0, 2.0]\n", "") if "tunes nothing" in message else text)
    with pytest.raises(UserError, match=message):
        load_spec(str(path))


def test_tuning_seeds_choose_and_the_chosen_factors_seeds_report_together(tmp_path):
    from megabatch.study.report import tuned, write_markdown

    path = tmp_path / "confirmed.toml"
    path.write_text(CONFIRMED)
    spec = load_spec(str(path))

    def row(method, factor, seed, val, test):
        return {"method": method, "batch": 256, "seed": seed, "lr_factor": factor, "final_val_top1": val,
                "final_top1": test}

    tuning = [row("linear", 0.5, 0, 80.0, 85.0), row("linear", 1.0, 0, 82.0, 81.0), row("linear", 2.0, 0, 70.0, 70.0),
              row("paper", 1.0, 0, 75.0, 76.0), row("paper", 2.0, 0, 79.0, 78.0)]
    # Confirmations of x1 that validate badly do not revise linear's choice.
    confirmed = [row("linear", 1.0, 1, 60.0, 83.0), row("linear", 1.0, 2, 61.0, 82.0), row("paper", 2.0, 1, 1.0, 80.0)]
    rows, chosen = tuned(spec, tuning + confirmed)
    assert chosen == {("linear", 256): 1.0, ("paper", 256): 2.0}
    assert rows == [tuning[1], *confirmed[:2], tuning[4], confirmed[2]]
    write_markdown(spec, tuning + confirmed, tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text()
    assert "| linear | 82.00 ± 1.00 (3, lr x1) |" in report and "| paper | 79.00 ± 1.41 (2 of 3, lr x2) |" in report
    assert "confirmation seeds 1, 2 included" in report and "Partial: 1 of the 9 planned runs" in report
    # The tuning table shows what chose: seed 0 alone.
    assert "| linear | 256 | 80.00 / 85.00 | **82.00 / 81.00** | 70.00 / 70.00 |" in report
    assert "| paper | 256 |  | 75.00 / 76.00 | **79.00 / 78.00** |" in report
    # linear chose inside its factors; paper's x2 is the largest it tried.
    assert "Chosen at the edge of the factors tried, so a rate beyond it might do better: paper at 256 (x2)." in report


def test_a_cell_chooses_once_all_its_tuning_seeds_have_finished(tmp_path):
    from megabatch.study.tuning import tuned

    path = tmp_path / "two-seeds.toml"
    path.write_text(TUNED.replace("seeds = [0]", "seeds = [0, 1]").replace("[0.5, 1.0, 2.0]", "[1.0, 2.0]"))
    spec = load_spec(str(path))
    rows = [{"method": "linear", "batch": 256, "seed": s, "lr_factor": f, "final_val_top1": 80.0 + f,
             "final_top1": 80.0} for s, f in ((0, 1.0), (0, 2.0), (1, 1.0))]
    assert tuned(spec, rows)[1] == {}  # seed 1 at x2 could still change the choice
    assert tuned(spec, rows + [{**rows[1], "seed": 1}])[1] == {("linear", 256): 2.0}


def test_a_study_with_confirm_seeds_end_to_end(tmp_path, fashion_dir, capsys):
    """The tuning runs choose, then the chosen factor runs at the confirmation seed in the
    same invocation; a second invocation finds everything done."""
    path = tmp_path / "confirmed.toml"
    path.write_text(CONFIRMED.replace("confirm_seeds = [1, 2]", "confirm_seeds = [1]"))
    out = tmp_path / "study"
    argv = ["study", "--spec", str(path), "--out", str(out), "--methods", "paper", "--parallel", "2",
            "--data", str(fashion_dir)]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    chosen = next(float(r["lr_factor"]) for r in rows if r["seed"] == "1")
    assert sorted((r["seed"], r["lr_factor"]) for r in rows) == [("0", "1.0"), ("0", "2.0"), ("1", str(chosen))]
    report = (out / "report.md").read_text()
    assert f"(2, lr x{chosen:g}) |" in report  # paper's cell: its seeds 0 and 1 at the chosen factor
    info = json.loads((out / "study.json").read_text())  # the whole grid's plan, and this invocation's
    assert info["runs"] == 3 + 2 + 2 * 1 and info["this_invocation"]["runs"] == 2 + 1
    assert "[3/3] paper/b256-s1" in capsys.readouterr().out  # the confirmation, in the same invocation
    waiting = [*argv[:6], "linear", *argv[7:], "--seeds", "1"]  # linear has not tuned: nothing to confirm
    assert main(waiting) == 0
    assert "1 run waits for their cells' tuning runs to finish" in capsys.readouterr().out
    assert not (out / "runs" / "linear").exists()
    assert main(argv) == 0
    assert "3 runs (3 already done" in capsys.readouterr().out


def test_beyond_an_edge_is_the_edges_ratio_to_its_neighbour_once_more():
    from megabatch.study.tuning import beyond

    assert beyond([0.5, 1.0, 2.0], 2.0) == 4.0 and beyond([1.0, 0.5, 2.0], 0.5) == 0.25
    assert beyond([0.25, 0.5, 1.0, 2.0], 0.25) == 0.125 and beyond([1.0, 3.0], 3.0) == 9.0


def test_a_best_factor_at_the_edge_is_widened_before_the_cell_chooses(tmp_path):
    from megabatch.study.report import write_markdown
    from megabatch.study.tuning import choices, planned_total

    path = tmp_path / "widened.toml"
    path.write_text(CONFIRMED.replace("confirm_seeds = [1, 2]", "confirm_seeds = [1]\nwiden_edges = 1"))
    spec = load_spec(str(path))

    def row(method, factor, val, seed=0):
        return {"method": method, "batch": 256, "seed": seed, "lr_factor": factor, "final_val_top1": val,
                "final_top1": val - 1}

    tuning = [row("linear", 0.5, 80.0), row("linear", 1.0, 82.0), row("linear", 2.0, 84.0),
              row("paper", 1.0, 75.0), row("paper", 2.0, 70.0)]
    assert choices(spec, tuning) == ({}, {("linear", 256): 4.0, ("paper", 256): 0.5})
    assert planned_total(spec, tuning) == 5 + 2 * 1 + 2  # the grid, the confirmations, the widenings
    write_markdown(spec, tuning, tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text()  # the factors to try next are missing
    assert "| linear | 256 | 80.00 / 79.00 | 82.00 / 81.00 | 84.00 / 83.00 | missing |" in report
    assert "| paper | 256 | missing | 75.00 / 74.00 | 70.00 / 69.00 |  |" in report
    assert "| linear | choosing |" in report and '"choosing" a tuned cell whose' in report
    # linear's x4 falls back: x2 is now inside what it tried. paper's x0.5 is better still,
    # but one widening is all it may have: it chooses x0.5, at the edge, and says so.
    widened = [row("linear", 4.0, float("nan")), row("paper", 0.5, 77.0)]
    assert choices(spec, tuning + widened) == ({("linear", 256): 2.0, ("paper", 256): 0.5}, {})
    assert [r.key for r in spec.confirmations(choices(spec, tuning + widened)[0])] == [
        "linear/b256-s1-lr2", "paper/b256-s1-lr0.5"]
    every = tuning + widened + [row("linear", 2.0, 83.0, seed=1)]
    write_markdown(spec, every, tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text()
    assert "| method | batch | x0.5 | x1 | x2 | x4 |" in report
    assert "| linear | 256 | 80.00 / 79.00 | 82.00 / 81.00 | **84.00 / 83.00** | diverged |" in report
    assert "| paper | 256 | **77.00 / 76.00** | 75.00 / 74.00 | 70.00 / 69.00 |  |" in report
    assert "| linear | 82.50 ± 0.71 (2, lr x2) |" in report and "| paper | 76.00 (1 of 2, lr x0.5) |" in report
    assert "tried the next one beyond (up to 1 more)" in report
    assert "so a rate beyond it might do better: paper at 256 (x0.5)." in report
    assert "Partial: 1 of the 9 planned runs" in report


def test_a_cell_whose_every_factor_diverged_widens_below_its_smallest(tmp_path):
    from megabatch.study.report import write_markdown
    from megabatch.study.tuning import choices

    path = tmp_path / "widened.toml"
    path.write_text(TUNED.replace("seeds = [0]", "seeds = [0]\nwiden_edges = 2"))
    spec = load_spec(str(path), methods=["paper"])
    nan = float("nan")

    def row(factor, val):
        return {"method": "paper", "batch": 256, "seed": 0, "lr_factor": factor, "final_val_top1": val,
                "final_top1": val}

    rows = [row(1.0, nan), row(2.0, nan)]
    assert choices(spec, rows) == ({}, {("paper", 256): 0.5})  # the search went too high
    assert choices(spec, rows + [row(0.5, nan)]) == ({}, {("paper", 256): 0.25})
    # out of widenings, still nothing trains: the recipe's own rate, diverged, and the report says so
    every = rows + [row(0.5, nan), row(0.25, nan)]
    assert choices(spec, every) == ({("paper", 256): 1.0}, {})
    write_markdown(spec, every, tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text()
    assert "| paper | 256 | diverged | diverged | **diverged** | diverged |" in report
    assert "Every factor tried diverged, so a smaller rate might train: paper at 256." in report
    assert "Chosen at the edge" not in report
    # once one trains, it is the best, at the lower edge: with no widening left, the choice
    trains = rows + [row(0.5, nan), row(0.25, 60.0)]
    assert choices(spec, trains) == ({("paper", 256): 0.25}, {})
    write_markdown(spec, trains, tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text()
    assert "might do better: paper at 256 (x0.25)." in report and "Every factor tried" not in report
    path.write_text(TUNED)  # without widen_edges, all diverged is the choice at once
    assert choices(load_spec(str(path), methods=["paper"]), rows) == ({("paper", 256): 1.0}, {})


def test_a_widened_study_end_to_end(tmp_path, fashion_dir, capsys):
    """paper tries x1 and x2, so its best is an edge: it tries one factor beyond, chooses,
    then confirms, all in one invocation; the report reads every run back."""
    path = tmp_path / "widened.toml"
    path.write_text(CONFIRMED.replace("confirm_seeds = [1, 2]", "confirm_seeds = [1]\nwiden_edges = 1"))
    out = tmp_path / "study"
    assert main(["study", "--spec", str(path), "--out", str(out), "--methods", "paper", "--parallel", "2",
                 "--data", str(fashion_dir)]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    factors = sorted(float(r["lr_factor"]) for r in rows if r["seed"] == "0")
    assert factors in ([0.5, 1.0, 2.0], [1.0, 2.0, 4.0]) and [r["seed"] for r in rows].count("1") == 1
    assert "[4/4]" in capsys.readouterr().out
    assert "| x0.5 | x1 | x2 |" in (out / "report.md").read_text() or "| x1 | x2 | x4 |" in (out / "report.md").read_text()


def test_a_widened_factor_counts_all_its_seeds_until_they_finish(tmp_path):
    from megabatch.study.report import write_markdown
    from megabatch.study.tuning import choices, planned_total

    path = tmp_path / "two-seeds.toml"
    path.write_text(TUNED.replace("seeds = [0]", "seeds = [0, 1]\nwiden_edges = 1"))
    spec = load_spec(str(path), methods=["paper"])

    def row(factor, seed, val):
        return {"method": "paper", "batch": 256, "seed": seed, "lr_factor": factor, "final_val_top1": val,
                "final_top1": val}

    rows = [row(1.0, 0, 70.0), row(1.0, 1, 71.0), row(2.0, 0, 75.0), row(2.0, 1, 76.0)]
    assert choices(spec, rows)[1] == {("paper", 256): 4.0} and planned_total(spec, rows) == 4 + 2
    partly = rows + [row(4.0, 0, 60.0)]  # one of x4's two seeds: undecided, and one run to go
    assert choices(spec, partly) == ({}, {}) and planned_total(spec, partly) == 4 + 2
    write_markdown(spec.whole(), partly, tmp_path / "report.md")
    assert "Partial: 7 of the 12 planned runs" in (tmp_path / "report.md").read_text()  # with linear's 6


def test_a_run_that_diverged_before_its_first_evaluation_has_a_nan_validation(tmp_path):
    from megabatch.study.runner import summarize

    spec = load_spec("fashion-mnist-paper-budget-tuned")
    folder = tmp_path / "run"
    folder.mkdir()
    row = summarize(spec.runs()[0], folder, diverged=True, wall_time_s=1.0)
    assert math.isnan(row["final_val_top1"]) and math.isnan(row["final_top1"])
