"""megabatch simulate: the all-reduce formulas against hand-computed cases, the
model's monotonic behaviour, the paper's record, and the command's input and output.
The straggler term, the records and the leave-one-out fit: test_simulate_fit.py."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from contextlib import redirect_stdout
from dataclasses import replace
from io import StringIO
from pathlib import Path

import pytest

from megabatch.errors import UserError
from megabatch.simulate import command, fit, hardware, perfmodel
from megabatch.simulate.bench_file import step_cv
from megabatch.simulate.perfmodel import Network, Workload

PAPER_TIME_S = 897.9
PAPER_EFFICIENCY_VS_1GPU = 0.70
PAPER_EFFICIENCY_VS_1NODE = 0.80

# Two nodes' worth of made-up but round figures, so the hand computations stay readable.
NET = Network(gpus_per_node=8, intra_node_bw=20e9, inter_node_bw=10e9,
              intra_latency=2e-6, inter_latency=10e-6)


def simulate(*argv: str) -> dict:
    """Run the command with --json and return the parsed object."""
    parser = argparse.ArgumentParser()
    command.configure_parser(parser)
    args = parser.parse_args([*argv, "--json"])
    out = StringIO()
    with redirect_stdout(out):
        assert command.run(args) == 0
    return json.loads(out.getvalue())


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.configure_parser(parser)
    return parser.parse_args(list(argv))


# --- the formulas, computed by hand -------------------------------------------------

def test_ring_matches_hand_computation():
    # 2 (p-1)/p n/B + 2 (p-1) a with n = 100 MB, p = 8, B = 10 GB/s, a = 5 us
    assert perfmodel.ring_allreduce(100e6, 8, 10e9, 5e-6) == pytest.approx(
        2 * 7 / 8 * 100e6 / 10e9 + 2 * 7 * 5e-6)
    assert perfmodel.ring_allreduce(100e6, 8, 10e9, 5e-6) == pytest.approx(0.01757)
    assert perfmodel.ring_allreduce(100e6, 1, 10e9, 5e-6) == 0.0


def test_every_algorithm_is_the_intra_node_ring_on_one_node():
    expected = 2 * 7 / 8 * 64e6 / 20e9 + 2 * 7 * 2e-6
    for algorithm in perfmodel.ALGORITHMS:
        assert perfmodel.allreduce_time(64e6, 8, NET, algorithm) == pytest.approx(expected)


def test_ring_across_nodes_matches_hand_computation():
    # 32 GPUs on 4 nodes: bandwidth min(20, 10) GB/s; 4 of every 32 hops leave a node,
    # so a step's latency is 0.875 * 2 us + 0.125 * 10 us = 3 us.
    expected = 2 * 31 / 32 * 64e6 / 10e9 + 2 * 31 * 3e-6
    assert expected == pytest.approx(0.012586)
    assert perfmodel.allreduce_time(64e6, 32, NET, "ring") == pytest.approx(expected)


def test_ring_with_one_gpu_per_node_uses_the_network_only():
    net = replace(NET, gpus_per_node=1)
    assert perfmodel.allreduce_time(64e6, 4, net, "ring") == pytest.approx(
        2 * 3 / 4 * 64e6 / 10e9 + 2 * 3 * 10e-6)


def test_hierarchical_matches_hand_computation():
    # chain reduce in the node (n/B + 7 a), ring over 4 node leaders, chain broadcast
    reduce = 64e6 / 20e9 + 7 * 2e-6
    leaders = 2 * 3 / 4 * 64e6 / 10e9 + 2 * 3 * 10e-6
    assert 2 * reduce + leaders == pytest.approx(0.016088)
    assert perfmodel.allreduce_time(64e6, 32, NET, "hierarchical") == pytest.approx(0.016088)


def test_2d_torus_matches_hand_computation():
    # reduce-scatter in the node, 8 vertical rings on 8 MB each at 10/8 GB/s, all-gather
    scatter = 7 / 8 * 64e6 / 20e9 + 7 * 2e-6
    vertical = 2 * 3 / 4 * 8e6 / 1.25e9 + 2 * 3 * 10e-6
    assert 2 * scatter + vertical == pytest.approx(0.015288)
    assert perfmodel.allreduce_time(64e6, 32, NET, "2d-torus") == pytest.approx(0.015288)


def test_hierarchical_and_torus_need_whole_nodes():
    with pytest.raises(ValueError, match="whole nodes"):
        perfmodel.allreduce_time(64e6, 12, NET, "2d-torus")
    # the ring takes 12: 2 of its 12 hops leave a node
    assert perfmodel.allreduce_time(64e6, 12, NET, "ring") == pytest.approx(
        2 * 11 / 12 * 64e6 / 10e9 + 22 * ((10 / 12) * 2e-6 + (2 / 12) * 10e-6))


def test_step_time_adds_compute_exposed_allreduce_and_overhead():
    work = Workload(per_gpu_batch=32, images_per_s=160.0, grad_bytes=64e6, overlap=0.0,
                    overhead_s=0.001)
    step = perfmodel.step_time(work, NET, 32, "ring")
    assert step.compute_s == pytest.approx(0.2)
    assert step.allreduce_exposed_s == pytest.approx(0.012586)
    assert step.total_s == pytest.approx(0.2 + 0.012586 + 0.001)
    # Behind the whole backward pass (2/3 of 0.2 s) the all-reduce disappears.
    hidden = perfmodel.step_time(replace(work, overlap=1.0), NET, 32, "ring")
    assert hidden.allreduce_exposed_s == 0.0
    # One GPU neither all-reduces nor pays the distribution overhead.
    assert perfmodel.step_time(work, NET, 1, "ring").total_s == pytest.approx(0.2)


def test_a_slow_input_pipeline_limits_the_step():
    work = Workload(per_gpu_batch=32, images_per_s=160.0, grad_bytes=0.0,
                    input_images_per_s_per_node=640.0)
    step = perfmodel.step_time(work, NET, 8, "ring")
    assert step.total_s == pytest.approx(8 * 32 / 640)
    # Waiting is what the loader lags behind compute and the (latency-only) all-reduce.
    assert step.input_wait_s == pytest.approx(0.4 - 0.2 - 14 * 2e-6)


def test_efficiency_is_one_at_one_gpu_and_at_one_node():
    work = Workload(per_gpu_batch=32, images_per_s=160.0, grad_bytes=64e6)
    schedule = perfmodel.Schedule(epochs=1, dataset_size=100_000)
    assert perfmodel.predict(work, NET, 1, "ring", schedule).efficiency_vs_1gpu == pytest.approx(1)
    node = perfmodel.predict(work, NET, 8, "ring", schedule)
    assert node.efficiency_vs_1node == pytest.approx(1)
    assert node.efficiency_vs_1gpu < 1
    assert perfmodel.predict(work, NET, 4, "ring", schedule).efficiency_vs_1node is None


@pytest.mark.parametrize("algorithm, allreduce", [
    # ring of 16 over 2 nodes: B = min(20, 10) GB/s, 2 of 16 hops leave a node:
    # latency 14/16 * 2 us + 2/16 * 10 us = 3 us
    ("ring", 2 * 15 / 16 * 64e6 / 10e9 + 2 * 15 * 3e-6),
    # chain-reduce in each node, ring over the 2 node leaders, chain-broadcast
    ("hierarchical", 2 * (64e6 / 20e9 + 7 * 2e-6) + (2 * 1 / 2 * 64e6 / 10e9 + 2 * 1 * 10e-6)),
])
def test_efficiency_at_two_nodes_matches_hand_computation(algorithm, allreduce):
    # Step times: 1 GPU 0.2 s (no all-reduce, no overhead); 1 node 0.2 s + its intra-node
    # ring (2 * 7/8 * 64 MB / 20 GB/s + 14 * 2 us) + 0.5 ms call + 1 ms overhead; 16 GPUs
    # 0.2 s + its all-reduce + 0.5 ms + 1 ms. Efficiency: throughput per GPU over the
    # baseline's, i.e. the baseline's step time over the run's (same batch per GPU).
    work = Workload(per_gpu_batch=32, images_per_s=160.0, grad_bytes=64e6, overhead_s=0.001,
                    collective_overhead_s=0.0005)
    one_gpu = 0.2
    one_node = 0.2 + (2 * 7 / 8 * 64e6 / 20e9 + 14 * 2e-6) + 0.0005 + 0.001
    sixteen = 0.2 + allreduce + 0.0005 + 0.001
    assert one_node == pytest.approx(0.207128)
    assert sixteen == pytest.approx({"ring": 0.21359, "hierarchical": 0.214348}[algorithm])
    run = perfmodel.predict(work, NET, 16, algorithm, perfmodel.Schedule(epochs=1, dataset_size=100_000))
    assert run.step.total_s == pytest.approx(sixteen)
    assert run.images_per_s == pytest.approx(16 * 32 / sixteen)
    assert run.efficiency_vs_1gpu == pytest.approx(one_gpu / sixteen)
    assert run.efficiency_vs_1node == pytest.approx(one_node / sixteen)
    assert run.efficiency_vs_1gpu == pytest.approx({"ring": 0.936373, "hierarchical": 0.933062}[algorithm], abs=1e-6)
    assert run.efficiency_vs_1node == pytest.approx({"ring": 0.969746, "hierarchical": 0.966316}[algorithm], abs=1e-6)


def test_epoch_boundaries_count_steps():
    work = Workload(per_gpu_batch=10, images_per_s=100.0, grad_bytes=0.0)
    steps = {b: perfmodel.predict(work, NET, 1, "ring", perfmodel.Schedule(3, 105, b)).steps
             for b in perfmodel.EPOCH_BOUNDARIES}
    assert steps == {"wrap": 32, "partial": 33, "drop": 30}   # ceil(315/10), 3 x 11, 3 x 10
    partial = perfmodel.predict(work, NET, 1, "ring", perfmodel.Schedule(3, 105, "partial"))
    assert partial.total_time_s == pytest.approx(3 * (10 * 0.1 + 0.05))


@pytest.mark.parametrize("boundary", ["partial", "drop"])
def test_a_fractional_run_with_whole_epochs_counts_the_epochs_it_trains(boundary):
    # partial and drop train whole epochs: 2.5 epochs run 3, and an epoch takes what one does
    work = Workload(per_gpu_batch=10, images_per_s=100.0, grad_bytes=0.0)
    whole = perfmodel.predict(work, NET, 1, "ring", perfmodel.Schedule(3, 105, boundary, eval_every=1))
    part = perfmodel.predict(work, NET, 1, "ring", perfmodel.Schedule(2.5, 105, boundary, eval_every=1))
    assert part.steps == whole.steps and part.eval_time_s == whole.eval_time_s > 0
    assert part.epoch_time_s == pytest.approx(whole.epoch_time_s) and part.epochs == 3
    wrap = perfmodel.predict(work, NET, 1, "ring", perfmodel.Schedule(2.5, 105, "wrap"))
    assert wrap.steps == 27 and wrap.epoch_time_s == pytest.approx(27 * 0.1 / 2.5)


# --- monotonic behaviour over every algorithm and preset ------------------------------

def preset_model(preset: hardware.Preset, comm_dtype: str = "fp16") -> tuple[Workload, Network]:
    figures = {name: figure.value for name, figure in preset.figures().items()}
    params = hardware.MODELS["resnet50"]
    work = Workload(
        per_gpu_batch=figures["per_gpu_batch"], images_per_s=figures["images_per_sec_per_gpu"],
        grad_bytes=params * perfmodel.BYTES_PER_ELEMENT[comm_dtype], overlap=figures["overlap"],
        overhead_s=perfmodel.pack_overhead(params, comm_dtype, figures["memory_gbs"] * 1e9))
    net = Network(figures["gpus_per_node"], figures["intra_node_gbps"] * 1e9 / 8,
                  figures["inter_node_gbps"] * 1e9 / 8, figures["intra_latency_us"] * 1e-6,
                  figures["latency_us"] * 1e-6)
    return work, net


CASES = [(preset, algorithm, gpus) for preset in hardware.PRESETS
         for algorithm in perfmodel.ALGORITHMS for gpus in (1, 8, 64, 1024)]


@pytest.mark.parametrize("preset,algorithm,gpus", CASES)
def test_more_bandwidth_is_never_slower(preset, algorithm, gpus):
    work, net = preset_model(hardware.PRESETS[preset])
    base = perfmodel.step_time(work, net, gpus, algorithm).total_s
    for faster in (replace(net, intra_node_bw=2 * net.intra_node_bw),
                   replace(net, inter_node_bw=2 * net.inter_node_bw)):
        assert perfmodel.step_time(work, faster, gpus, algorithm).total_s <= base
        assert perfmodel.allreduce_time(work.grad_bytes, gpus, faster, algorithm) <= \
            perfmodel.allreduce_time(work.grad_bytes, gpus, net, algorithm)


@pytest.mark.parametrize("preset,algorithm,gpus", CASES)
def test_lower_latency_is_never_slower(preset, algorithm, gpus):
    work, net = preset_model(hardware.PRESETS[preset])
    base = perfmodel.step_time(work, net, gpus, algorithm).total_s
    for quicker in (replace(net, intra_latency=net.intra_latency / 2),
                    replace(net, inter_latency=net.inter_latency / 2)):
        assert perfmodel.step_time(work, quicker, gpus, algorithm).total_s <= base


@pytest.mark.parametrize("preset,algorithm,gpus", CASES)
def test_fp16_is_never_slower_than_fp32(preset, algorithm, gpus):
    schedule = perfmodel.Schedule(epochs=90, dataset_size=hardware.IMAGENET_TRAIN)
    times = {}
    for dtype in ("fp16", "fp32"):
        work, net = preset_model(hardware.PRESETS[preset], dtype)
        times[dtype] = perfmodel.predict(work, net, gpus, algorithm, schedule)
    assert times["fp16"].step.allreduce_s <= times["fp32"].step.allreduce_s
    assert times["fp16"].total_time_s <= times["fp32"].total_time_s
    if gpus > 1:  # half the bytes on the wire: strictly less time there
        assert times["fp16"].step.allreduce_s < times["fp32"].step.allreduce_s


@pytest.mark.parametrize("preset", hardware.PRESETS)
def test_every_preset_figure_has_a_source(preset):
    for name, figure in hardware.PRESETS[preset].figures().items():
        assert len(figure.source) > 10, name


# --- the paper's record on the MN-1 preset ------------------------------------------

def test_mn1_predicts_the_paper_time_within_15_percent():
    result = simulate("--preset", "mn1")
    assert result["gpus"] == 1024 and result["steps"] == 3519
    assert abs(result["total_time_s"] / PAPER_TIME_S - 1) < 0.15


def test_mn1_predicts_the_paper_efficiencies_within_7_points():
    # With the defaults: the parameters fitted on every record, the paper's among them.
    # The prediction from a fit without the paper is in test_simulate_fit.py.
    result = simulate("--preset", "mn1")
    assert abs(result["scaling_efficiency_vs_1gpu"] - PAPER_EFFICIENCY_VS_1GPU) <= 0.07
    assert abs(result["scaling_efficiency_vs_1node"] - PAPER_EFFICIENCY_VS_1NODE) <= 0.07


def test_without_the_empirical_terms_mn1_is_the_public_figures_model():
    # Both empirical parameters at zero give back the model of public figures alone.
    result = simulate("--preset", "mn1", "--step-cv", "0", "--collective-overhead-us", "0")
    assert result["total_time_s"] == pytest.approx(768.0, abs=0.1)
    assert result["scaling_efficiency_vs_1gpu"] == pytest.approx(0.857, abs=0.001)
    assert result["scaling_efficiency_vs_1node"] == pytest.approx(0.928, abs=0.001)
    assert result["breakdown"]["per_step"]["straggler_s"] == 0.0


# --- the command ------------------------------------------------------------------------

def test_json_has_the_promised_keys():
    result = simulate("--preset", "dgx-a100", "--gpus", "64", "--comm-dtype", "fp16")
    for key in ("step_time_s", "epoch_time_s", "total_time_s", "images_per_s",
                "scaling_efficiency_vs_1gpu", "scaling_efficiency_vs_1node", "breakdown"):
        assert key in result
    assert set(result["breakdown"]["per_step"]) >= {"compute_s", "allreduce_s",
                                                    "allreduce_exposed_s", "overhead_s",
                                                    "straggler_s"}
    assert result["total_time_s"] == pytest.approx(result["epoch_time_s"] * 90)
    assert result["inputs"]["comm_dtype"] == "fp16" and result["gpus"] == 64


def test_flags_override_the_preset():
    base = simulate("--preset", "mn1")
    faster = simulate("--preset", "mn1", "--intra-node-gbps", "96", "--images-per-sec-per-gpu", "200")
    assert faster["inputs"]["intra_node_gbps"] == 96.0
    assert faster["total_time_s"] < base["total_time_s"]


def test_sweep_prints_one_object_per_gpu_count():
    result = simulate("--sweep-gpus", "1,8,64")
    assert [p["gpus"] for p in result["sweep"]] == [1, 8, 64]
    assert result["sweep"][0]["scaling_efficiency_vs_1gpu"] == pytest.approx(1.0)


def test_table_output(capsys):
    assert command.run(parse("--preset", "mn1")) == 0
    out = capsys.readouterr().out
    assert "scaling efficiency" in out and "MN-1" in out
    assert "  GPUs                1024 = 128 node(s) x 8, global batch 32,768, 3,519 steps" in out
    assert command.run(parse("--preset", "mn1", "--gpus", "12")) == 0  # a node not full
    assert "  GPUs                12 on 2 node(s) (8 x 1 + 4), global batch 384" in capsys.readouterr().out


def write_bench(path: Path, steps: list) -> str:
    path.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "train_step": steps}))
    return str(path)


def test_from_bench_takes_the_fastest_entry_or_the_named_one(tmp_path):
    bench = write_bench(tmp_path / "bench.json", [
        {"name": "resnet50-fp32", "images_per_s": 900.0, "batch_size": 128},
        {"name": "resnet50-amp", "images_per_s": 2900.0, "batch_size": 256}])
    fastest = simulate("--preset", "dgx-h100", "--from-bench", bench)
    assert fastest["inputs"]["images_per_sec_per_gpu"] == 2900.0
    assert fastest["inputs"]["per_gpu_batch"] == 256
    named = simulate("--preset", "dgx-h100", "--from-bench", bench, "--bench-entry", "resnet50-fp32",
                     "--per-gpu-batch", "64")
    assert named["inputs"]["images_per_sec_per_gpu"] == 900.0
    assert named["inputs"]["per_gpu_batch"] == 64


@pytest.mark.parametrize("content,message", [
    (None, "cannot read"),
    ("{not json", "not JSON"),
    ('{"device": "x"}', "not a megabatch bench result"),
    ('{"device": "x", "train_step": []}', "not a megabatch bench result"),
    ('{"device": "x", "train_step": [{"name": "a", "images_per_s": -1}]}', "positive"),
])
def test_from_bench_errors_are_one_line(tmp_path, content, message):
    path = tmp_path / "bench.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message) as err:
        command.run(parse("--from-bench", str(path)))
    assert "\n" not in str(err.value)


def test_from_bench_takes_the_benchs_model_and_each_entrys_step_count(tmp_path):
    # the small CNN's bench writes its model and, per entry, the steps of each repeat
    path = tmp_path / "small-cnn.json"
    rates = [7900.0, 8000.0, 8150.0]
    path.write_text(json.dumps({"device": "cpu", "model": "small-cnn", "settings": {"steps": None},
                                "train_step": [{"name": "x", "images_per_s": 8000.0, "batch_size": 2048,
                                                "steps_per_repeat": 3, "per_repeat": rates}]}))
    result = simulate("--preset", "dgx-h100", "--gpus", "64", "--from-bench", str(path))
    assert result["inputs"]["model"] == "small-cnn"
    assert result["inputs"]["parameters"] == hardware.MODELS["small-cnn"]
    assert result["inputs"]["step_cv"] == pytest.approx(step_cv(rates, 3)) and step_cv(rates, 3) != fit.FITTED.step_cv
    assert simulate("--preset", "dgx-h100", "--from-bench", str(path), "--model", "small-cnn")["inputs"][
        "model"] == "small-cnn"
    with pytest.raises(UserError, match="timed small-cnn, not --model resnet50: leave out --model"):
        command.run(parse("--preset", "dgx-h100", "--from-bench", str(path), "--model", "resnet50"))


def test_from_bench_unknown_entry_and_conflicting_flags(tmp_path):
    bench = write_bench(tmp_path / "bench.json", [{"name": "a", "images_per_s": 10.0}])
    with pytest.raises(UserError, match="choose one of a"):
        command.run(parse("--from-bench", bench, "--bench-entry", "b"))
    with pytest.raises(UserError, match="not both"):
        command.run(parse("--from-bench", bench, "--images-per-sec-per-gpu", "5"))


def test_plot_is_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "scaling.png"
    assert command.run(parse("--sweep-gpus", "1,8,64,512,1024", "--plot", str(path))) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot written" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--gpus", "12", "--allreduce", "hierarchical"], "whole nodes"),
    (["--sweep-gpus", "8,12", "--allreduce", "2d-torus"], "whole nodes"),
    (["--gpus", "-8"], "must be positive"),
    (["--inter-node-gbps", "-5"], "must be positive"),
    (["--images-per-sec-per-gpu", "0"], "must be positive"),
    (["--latency-us", "-1"], "zero or more"),
    (["--overlap", "1.5"], "0 to 1"),
    (["--preset", "cray-1"], "unknown preset"),
    (["--model", "resnet5000"], "unknown --model"),
    (["--model", "-3"], "unknown --model"),
    (["--comm-dtype", "fp8"], "unknown --comm-dtype"),
    (["--allreduce", "butterfly"], "unknown --allreduce"),
    (["--step-cv", "-0.1"], "zero or more"),
    (["--collective-overhead-us", "-1"], "zero or more"),
    (["--epoch-boundary", "sometimes"], "unknown --epoch-boundary"),
    (["--sweep-gpus", "1,x"], "--sweep-gpus '1,x' must be comma-separated whole numbers"),
    (["--sweep-gpus", "8,0"], "whole numbers of at least 1, e.g. 1,8,64,512,1024"),
    (["--dataset-size", "1000", "--epoch-boundary", "drop"], "exceeds the dataset of 1,000 and drop skips it"),
    (["--epochs", "1e-12"], "less than one step; give more epochs"),
    (["--epochs", "inf"], "--epochs must be positive and finite, not inf"),
    (["--epochs", "nan"], "--epochs must be positive and finite"),
    (["--images-per-sec-per-gpu", "inf"], "positive and finite"),
    (["--overhead-ms", "inf"], "zero or more and finite"),
    (["--step-cv", "inf"], "zero or more and finite"),
    (["--latency-us", "inf"], "zero or more and finite"),
    (["--input-images-per-sec-per-node", "inf"], "positive and finite"),
    (["--model", "inf"], "unknown --model"),
    (["--model", "1e400"], "unknown --model"),
    (["--eval-every", "1e-300"], "more often than every training step"),
])
def test_nonsense_is_a_user_error(argv, message):
    with pytest.raises(UserError, match=message):
        command.run(parse(*argv))


def test_a_parameter_count_is_a_model():
    result = simulate("--model", "1e6")
    assert result["inputs"]["parameters"] == 1_000_000


def test_importing_the_command_does_not_import_torch():
    code = ("import sys; import megabatch.simulate.command; "
            "sys.exit('torch' in sys.modules or 'matplotlib' in sys.modules)")
    env_path = str(Path(command.__file__).parents[2])
    result = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": env_path},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
