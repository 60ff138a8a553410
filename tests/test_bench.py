"""megabatch bench: a real --quick run through the command line writes a JSON result that
`megabatch simulate --from-bench` accepts; so does one of `--model small-cnn`, with every
comparison of the demo's step; bad flags are one-line errors. Speed is never asserted."""

from __future__ import annotations

import json
import math
import platform
import re
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch

from megabatch import kernels
from megabatch.bench import report, timing
from megabatch.build import native_bf16
from megabatch.cli import main
from megabatch.nn import ghost_bn_implementation


@pytest.fixture(scope="module")
def one_thread():
    # The test machine has 2 cores, often shared: one thread keeps the quick run quick.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick(tmp_path_factory, one_thread, fashion_dir) -> tuple[Path, str]:
    """(the JSON written, what was printed) of `megabatch bench --quick --out DIR`."""
    out = tmp_path_factory.mktemp("bench") / "results"
    printed = StringIO()
    with redirect_stdout(printed):
        # On the CPU also where a GPU is visible: the assertions below are about the CPU run.
        assert main(["bench", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    written = list(out.iterdir())
    assert len(written) == 1
    return written[0], printed.getvalue()


@pytest.fixture(scope="module")
def small(tmp_path_factory, one_thread) -> tuple[Path, str]:
    """(the JSON written, what was printed) of `megabatch bench --model small-cnn --quick`."""
    out = tmp_path_factory.mktemp("bench-small") / "results"
    printed = StringIO()
    with redirect_stdout(printed):
        assert main(["bench", "--model", "small-cnn", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    written = list(out.iterdir())
    assert len(written) == 1
    return written[0], printed.getvalue()


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_run_writes_one_json_with_every_measurement(quick):
    path, _ = quick
    assert re.fullmatch(r"cpu-[a-z0-9-]+-\d{4}-\d{2}-\d{2}\.json", path.name)
    result = json.loads(path.read_text())
    for key in ("device", "torch", "torchvision", "git_commit", "command", "note", "settings", "train_step",
                "ghost_bn", "input_pipeline", "end_to_end", "end_to_end_by_decoder", "mfu"):
        assert key in result, key
    assert result["complete"] is True
    assert "CPU" in result["note"] and result["device"].startswith("cpu")
    assert result["settings"]["image_size"] == 32 and result["settings"]["batch"] == 8
    assert result["settings"]["ghost_bn"] == ghost_bn_implementation(torch.device("cpu"))
    [megabatch] = result["train_step"]  # --quick: fp32 contiguous eager only
    assert megabatch["name"] == "megabatch fp32 contiguous eager"
    assert (megabatch["precision"], megabatch["memory_format"], megabatch["compile"]) == ("fp32", "contiguous", False)
    # Its plain twin ran at the same settings, and the ratio is theirs.
    plain = megabatch["plain"]
    assert plain["name"] == "plain PyTorch fp32 contiguous eager"
    for entry in (megabatch, plain):
        low, high = entry["spread"]
        assert positive(entry["images_per_s"]) and low <= entry["images_per_s"] <= high and positive(entry["mfu"])
    assert megabatch["ratio_to_plain"] == pytest.approx(megabatch["images_per_s"] / plain["images_per_s"])
    assert megabatch["batch_size"] == 8 and megabatch["per_worker_batch"] == 4  # two workers: ghost BN is on
    ghost = result["ghost_bn"]
    assert ghost["per_worker_batch"] == 4 and positive(ghost["plain_images_per_s"])
    assert ghost["ratio"] == pytest.approx(ghost["ghost_images_per_s"] / ghost["plain_images_per_s"])
    decoders = {entry["decoder"] for entry in result["input_pipeline"]}
    assert decoders == {"pil", "device"}
    assert all(positive(entry["images_per_s"]) for entry in result["input_pipeline"])
    assert any("CPU decoding" in entry["name"] for entry in result["input_pipeline"])
    # End to end with the device decoder always, and with the fastest reader; the best is the result's.
    by_decoder = result["end_to_end_by_decoder"]
    assert by_decoder[0]["decoder"] == "device" and len(by_decoder) in (1, 2)
    e2e = result["end_to_end"]
    assert e2e == max(by_decoder, key=lambda entry: entry["images_per_s"])
    assert positive(e2e["images_per_s"]) and positive(e2e["peak_memory_bytes"]) and positive(e2e["mfu"])
    assert e2e["ratio_to_plain"] == pytest.approx(e2e["images_per_s"] / plain["images_per_s"])
    assert positive(result["mfu"]["matmul_flops"]["fp32"]) and positive(result["mfu"]["best_train_step"]["mfu"])
    assert "profile" not in result and "profile" not in megabatch  # on a CPU only with --profile


def test_quick_run_says_where_the_time_goes(quick):
    path, printed = quick
    result = json.loads(path.read_text())
    summary = result["where_the_time_goes"]
    # The fastest eager setting: the one end to end ran with (--quick has no compiled one).
    fastest = max((e for e in result["train_step"] if not e["compile"]), key=lambda entry: entry["images_per_s"])
    assert summary["train_step_images_per_s"] == fastest["images_per_s"]
    assert summary["ratio_to_plain"] == pytest.approx(fastest["ratio_to_plain"])
    assert summary["input_pipeline_images_per_s"] == max(e["images_per_s"] for e in result["input_pipeline"])
    assert summary["end_to_end_images_per_s"] == result["end_to_end"]["images_per_s"]
    assert "where the time goes (ms per 1,000 images)" in printed and "end to end" in printed


def test_with_compile_end_to_end_runs_again_with_the_compiled_step(tmp_path, monkeypatch, capsys):
    # The order and the result's fields, with torch.compile left out (minutes on this CPU):
    # in its place each forward pass counts as a graph run without CUDA graphs, as on a CPU.
    from torch._dynamo.utils import counters

    modes = []

    def compile_without_graphs(model, mode=None):
        modes.append(mode)
        model.register_forward_pre_hook(lambda *_: counters["inductor"].update(cudagraph_skips=1))
        return model

    monkeypatch.setattr(torch, "compile", compile_without_graphs)
    out = tmp_path / "results"
    assert main(["bench", "--quick", "--device", "cpu", "--compile", "--compile-mode", "reduce-overhead",
                 "--out", str(out)]) == 0
    assert modes == ["reduce-overhead"] * 3  # the two steps, then end to end
    [path] = out.iterdir()
    result = json.loads(path.read_text())
    assert [e["name"] for e in result["train_step"]] == [
        "megabatch fp32 contiguous eager", "megabatch fp32 contiguous compiled (reduce-overhead)"]
    *eager, compiled = result["end_to_end_by_decoder"]
    assert {e["name"] for e in eager} == {"megabatch fp32 contiguous eager"}
    assert compiled["name"] == "megabatch fp32 contiguous compiled (reduce-overhead)"
    assert compiled["decoder"] == max(eager, key=lambda e: e["images_per_s"])["decoder"]
    plain = result["train_step"][1]["plain"]["images_per_s"]
    assert compiled["ratio_to_plain"] == pytest.approx(compiled["images_per_s"] / plain)
    assert result["end_to_end"] == max(result["end_to_end_by_decoder"], key=lambda e: e["images_per_s"])
    assert result["where_the_time_goes"]["end_to_end_images_per_s"] == max(e["images_per_s"] for e in eager)
    eager_step, compiled_step = result["train_step"]
    assert "cudagraph_skips" not in eager_step and "cudagraph_skips" not in eager_step["plain"]
    assert compiled_step["cudagraph_skips"] > 0 and compiled_step["plain"]["cudagraph_skips"] > 0
    printed = capsys.readouterr().out
    assert "compiled (reduce-overhead)" in printed
    assert "megabatch fp32 contiguous compiled (reduce-overhead): " in printed and "ran without CUDA graphs" in printed


def test_where_the_time_goes_by_hand():
    # Train step 2,000 images/s (0.5 ms each), baseline 1,000, input 1,500, end to end 1,250.
    summary = report.where_the_time_goes(2000.0, 1000.0, 1500.0, 1250.0)
    assert summary["ratio_to_plain"] == 2.0 and summary["input_over_train_step"] == 0.75
    assert summary["input_keeps_up"] is False and summary["end_to_end_over_train_step"] == 0.625
    assert summary["ms_per_1000_images"] == {"train_step": 500.0, "input_pipeline": pytest.approx(666.667, abs=1e-3),
                                             "end_to_end": 800.0}
    lines = report.time_lines(summary, "megabatch bf16", "pil decode on CPU, 8 workers")
    assert "2.00x the plain loop at its settings" in lines[1]
    assert lines[2].endswith("pil decode on CPU, 8 workers: is the limit: it feeds 75% of what the train step takes")
    assert lines[3].endswith("62% of the train step's images/s")
    fed = report.where_the_time_goes(2000.0, 1000.0, 3000.0, 1900.0)
    assert fed["input_keeps_up"] is True
    assert "keeps up (1.50x the train step)" in report.time_lines(fed, "a", "b")[2]


def test_quick_run_prints_the_table(quick):
    path, printed = quick
    for column in ("measurement", "images/s", "spread (min-max)", "vs plain", "MFU"):
        assert column in printed
    assert "note: no GPU" in printed and "plain PyTorch fp32 contiguous eager" in printed and "ghost BN" in printed
    assert printed.rstrip().endswith(f"wrote {path}")


def test_simulate_reads_the_result(quick, capsys):
    path, _ = quick
    capsys.readouterr()
    assert main(["simulate", "--preset", "dgx-h100", "--from-bench", str(path), "--json"]) == 0
    inputs = json.loads(capsys.readouterr().out)["inputs"]
    fastest = max(entry["images_per_s"] for entry in json.loads(path.read_text())["train_step"])
    assert inputs["images_per_sec_per_gpu"] == pytest.approx(fastest) and inputs["per_gpu_batch"] == 8


def test_a_second_result_of_the_day_does_not_overwrite_the_first(tmp_path):
    first = report.output_path(tmp_path, "NVIDIA H100 80GB HBM3")
    assert re.fullmatch(r"nvidia-h100-80gb-hbm3-\d{4}-\d{2}-\d{2}\.json", first.name)
    first.write_text("{}")
    assert report.output_path(tmp_path, "NVIDIA H100 80GB HBM3").name == first.stem + "-2.json"


def test_small_cnn_quick_run_writes_every_comparison_with_provenance(small):
    path, printed = small
    assert re.fullmatch(r"small-cnn-cpu-[a-z0-9-]+-\d{4}-\d{2}-\d{2}\.json", path.name)
    result = json.loads(path.read_text())
    for key in ("device", "megabatch", "torch", "torchvision", "python", "host", "git_commit", "command", "note",
                "settings", "train_step", "megabatch_vs_plain", "ghost_bn", "noise_scale", "memory_format"):
        assert key in result, key
    assert result["model"] == "small-cnn" and result["flags"]["model"] == "small-cnn" and result["flags"]["quick"]
    settings = result["settings"]
    assert settings["recipe"] == "fashion-mnist-demo" and settings["image"] == [1, 28, 28]
    assert settings["global_batch"] == 128 and settings["micro_batch"] == 64 and settings["micro_batches"] == 2
    native = native_bf16(torch.device("cpu"))
    assert settings["native_bf16"] == native and settings["threads"] == 1
    # Which ghost BN ran: the C++ kernel, which writes gradients in place on x86-64.
    if kernels.disabled():
        assert settings["ghost_bn"].startswith("Python loop")
    else:
        in_place = platform.machine() == "x86_64"
        assert settings["ghost_bn"].startswith("C++ kernel")
        assert settings["ghost_bn"].endswith("written into place" if in_place else "copied into place")
    assert f"ghost BN: {settings['ghost_bn']}" in printed
    entries = {(e["loop"], e["precision"], e["plain_bn"], e["noise_scale"], e["contiguous"]): e
               for e in result["train_step"]}
    for precision in ("fp32", "bf16"):  # bf16 is measured, emulated or not
        assert ("plain", precision, False, False, False) in entries
        assert ("megabatch", precision, False, False, False) in entries
    for other in ((True, False, False), (False, True, False), (False, False, True)):
        assert ("megabatch", "fp32", *other) in entries
    for (loop, precision, plain_bn, _, _), entry in entries.items():
        low, high = entry["spread"]
        assert positive(entry["images_per_s"]) and low <= entry["images_per_s"] <= high
        assert len(entry["per_repeat"]) == 2 and entry["batch_size"] == 128 and entry["steps_per_repeat"] == 1
        plain = entries[("plain", precision, False, False, False)]
        assert entry["ratio_to_plain"] == pytest.approx(entry["images_per_s"] / plain["images_per_s"])
        assert entry["per_worker_batch"] == (None if loop == "plain" else 64 if plain_bn else 32)
        assert (entry.get("native_bf16") == native) if precision == "bf16" else "native_bf16" not in entry
        assert entry["name"] in printed and ("(emulated)" in entry["name"]) == (precision == "bf16" and not native)

    def rate(*key):
        return entries[(*key, False) if len(key) == 4 else key]["images_per_s"]

    vs_plain = result["megabatch_vs_plain"]
    for precision in ("fp32", "bf16"):
        assert vs_plain[precision]["ratio"] == pytest.approx(rate("megabatch", precision, False, False)
                                                             / rate("plain", precision, False, False))
    assert vs_plain["bf16"]["native_bf16"] == native
    ghost = result["ghost_bn"]["fp32"]
    assert ghost["ratio"] == pytest.approx(rate("megabatch", "fp32", False, False)
                                           / rate("megabatch", "fp32", True, False))
    assert ghost["group"] == 32 and ghost["plain_group"] == 64 and ghost["target"] == 0.95
    noise = result["noise_scale"]["fp32"]
    assert noise["ratio"] == pytest.approx(rate("megabatch", "fp32", False, True)
                                           / rate("megabatch", "fp32", False, False))
    assert noise["overhead"] == pytest.approx(1 / noise["ratio"] - 1) and noise["target"] == 0.05
    layout = result["memory_format"]["fp32"]
    assert layout["ratio"] == pytest.approx(rate("megabatch", "fp32", False, False, False)
                                            / rate("megabatch", "fp32", False, False, True))
    for ratio in (*vs_plain.values(), ghost, noise, layout):
        assert len(ratio["paired_ratios"]) == 2 and positive(ratio["paired_median"])
    assert ("bf16" in result["ghost_bn"]) == native and ("bf16" in result["noise_scale"]) == native
    for line in ("megabatch / plain PyTorch, fp32", "ghost BN / plain BN, fp32", "noise_scale on / off, fp32",
                 "channels-last / contiguous, fp32"):
        assert line in printed
    assert printed.rstrip().endswith(f"wrote {path}")


def test_interleaved_runs_the_configurations_in_turn():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timed = timing.interleaved(steps, {"a": 2, "b": 1, "c": 1}, "cpu", 8, 3)
    assert "".join(calls) == "aabc" + "cbaa" + "aabc"  # every other round in reverse
    assert all(len(m["per_repeat"]) == 3 and positive(m["images_per_s"]) for m in timed.values())
    ratio = timing.compare({"images_per_s": 6.0, "per_repeat": [4.0, 6.0, 9.0]},
                           {"images_per_s": 3.0, "per_repeat": [2.0, 3.0, 3.0]})
    assert ratio["ratio"] == 2.0 and ratio["paired_ratios"] == [2.0, 2.0, 3.0] and ratio["paired_spread"] == [2.0, 3.0]


@pytest.mark.parametrize("flags, message", [
    (["--batch", "0"], "--batch must be at least 4, not 0"),
    (["--batch", "5"], "give an even batch"),
    (["--image-size", "16"], "--image-size must be at least 32"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--precisions", "fp32,fp8"], "--precisions 'fp32,fp8': give a comma-separated list of fp32, bf16, fp16"),
    (["--memory-formats", ""], "give a comma-separated list of contiguous, channels_last"),
    (["--data", "/nonexistent"], "--data /nonexistent is not a folder"),
    (["--data", "."], "train is missing"),
    (["--model", "small-cnn", "--image-size", "64"], "--image-size is for --model resnet50"),
    (["--model", "small-cnn", "--batch", "100"], "not divisible by per_worker_batch"),
    (["--model", "small-cnn", "--batch", "64"], "the noise scale needs two or more"),
    (["--model", "small-cnn", "--warmup", "0"], "--warmup 0 needs --steps N"),
    (["--device", "cpu", "--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead measures a "
                                                               "compiled step: add --compile"),
    (["--model", "small-cnn", "--compile-mode", "max-autotune"], "--compile-mode is for --model resnet50"),
    (["--compile", "--compile-mode", "fast"], "--compile-mode fast: give one of default, reduce-overhead, "),
])
def test_bad_flags_are_one_line_errors(flags, message, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["bench", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megabatch: error: ") and err.count("\n") == 1 and message in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_a_compile_mode_names_both_steps_and_reaches_both(tmp_path, monkeypatch):
    from megabatch.bench.settings import Settings
    from megabatch.bench.steps import Config, megabatch_run, plain_name, time_plain

    assert Config("bf16", "channels_last").name == "megabatch bf16 channels_last eager"
    assert Config("bf16", "channels_last", True).name == "megabatch bf16 channels_last compiled"
    graphs = Config("bf16", "channels_last", True, "reduce-overhead")
    assert graphs.name == "megabatch bf16 channels_last compiled (reduce-overhead)"
    assert plain_name(graphs) == "plain PyTorch bf16 channels_last compiled (reduce-overhead)"
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    s = Settings(device="cpu", image_size=32, batch=8, steps=1, warmup=0, repeats=1, per_worker_batch=4,
                 precisions=("fp32",), memory_formats=("contiguous",), compile=True, profile=False, quick=True,
                 note="", compile_mode="reduce-overhead")
    config = Config("fp32", "contiguous", True, "reduce-overhead")
    assert megabatch_run(s, config, 4, tmp_path).recipe.train.compile_mode == "reduce-overhead"
    time_plain(s, config)
    assert modes == ["reduce-overhead", "reduce-overhead"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_without_a_gpu_is_a_one_line_error(capsys):
    assert main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
