"""megabatch bench: a real --quick run through the command line writes a JSON result that
`megabatch simulate --from-bench` accepts; bad flags are one-line errors."""

from __future__ import annotations

import json
import math
import re
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch

from megabatch import bench, bench_report
from megabatch.cli import main


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
        assert main(["bench", "--quick", "--out", str(out)]) == 0
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
                "ghost_bn", "input_pipeline", "end_to_end", "mfu"):
        assert key in result, key
    assert "CPU" in result["note"] and result["device"].startswith("cpu")
    assert result["settings"]["image_size"] == 32 and result["settings"]["batch"] == 8
    names = [entry["name"] for entry in result["train_step"]]
    assert names == ["megabatch fp32 contiguous eager", bench.BASELINE]
    for entry in result["train_step"]:
        low, high = entry["spread"]
        assert positive(entry["images_per_s"]) and low <= entry["images_per_s"] <= high
        assert positive(entry["ratio_to_baseline"]) and positive(entry["mfu"]) and entry["batch_size"] == 8
    megabatch, baseline = result["train_step"]
    assert baseline["ratio_to_baseline"] == 1.0
    assert megabatch["ratio_to_baseline"] == pytest.approx(megabatch["images_per_s"] / baseline["images_per_s"])
    assert megabatch["per_worker_batch"] == 4  # two emulated workers: ghost BN is really on
    ghost = result["ghost_bn"]
    assert ghost["per_worker_batch"] == 4 and positive(ghost["plain_images_per_s"])
    assert ghost["ratio"] == pytest.approx(ghost["ghost_images_per_s"] / ghost["plain_images_per_s"])
    decoders = {entry["decoder"] for entry in result["input_pipeline"]}
    assert decoders == {"pil", "device"}
    assert all(positive(entry["images_per_s"]) for entry in result["input_pipeline"])
    assert any("CPU decoding" in entry["name"] for entry in result["input_pipeline"])
    e2e = result["end_to_end"]
    assert positive(e2e["images_per_s"]) and positive(e2e["peak_memory_bytes"]) and positive(e2e["mfu"])
    assert positive(result["mfu"]["matmul_flops"]["fp32"]) and positive(result["mfu"]["best_train_step"]["mfu"])


def test_quick_run_says_where_the_time_goes(quick):
    path, printed = quick
    result = json.loads(path.read_text())
    summary = result["where_the_time_goes"]
    fastest = max(result["train_step"][:-1], key=lambda entry: entry["images_per_s"])
    assert summary["train_step_images_per_s"] == fastest["images_per_s"]
    assert summary["input_pipeline_images_per_s"] == max(e["images_per_s"] for e in result["input_pipeline"])
    assert summary["end_to_end_images_per_s"] == result["end_to_end"]["images_per_s"]
    assert "where the time goes (ms per 1,000 images)" in printed and "end to end" in printed


def test_where_the_time_goes_by_hand():
    # Train step 2,000 images/s (0.5 ms each), baseline 1,000, input 1,500, end to end 1,250.
    summary = bench_report.where_the_time_goes(2000.0, 1000.0, 1500.0, 1250.0)
    assert summary["ratio_to_baseline"] == 2.0 and summary["input_over_train_step"] == 0.75
    assert summary["input_keeps_up"] is False and summary["end_to_end_over_train_step"] == 0.625
    assert summary["ms_per_1000_images"] == {"train_step": 500.0, "input_pipeline": pytest.approx(666.667, abs=1e-3),
                                             "end_to_end": 800.0}
    lines = bench_report.time_lines(summary, "megabatch bf16", "pil decode on CPU, 8 workers")
    assert "2.00x the baseline" in lines[1]
    assert lines[2].endswith("pil decode on CPU, 8 workers: is the limit: it feeds 75% of what the train step takes")
    assert lines[3].endswith("62% of the train step's images/s")
    fed = bench_report.where_the_time_goes(2000.0, 1000.0, 3000.0, 1900.0)
    assert fed["input_keeps_up"] is True
    assert "keeps up (1.50x the train step)" in bench_report.time_lines(fed, "a", "b")[2]


def test_quick_run_prints_the_table(quick):
    path, printed = quick
    for column in ("measurement", "images/s", "spread (min-max)", "vs baseline", "MFU"):
        assert column in printed
    assert "note: no GPU" in printed and bench.BASELINE in printed and "ghost BN" in printed
    assert printed.rstrip().endswith(f"wrote {path}")


def test_simulate_reads_the_result(quick, capsys):
    path, _ = quick
    capsys.readouterr()
    assert main(["simulate", "--preset", "dgx-h100", "--from-bench", str(path), "--json"]) == 0
    inputs = json.loads(capsys.readouterr().out)["inputs"]
    fastest = max(entry["images_per_s"] for entry in json.loads(path.read_text())["train_step"])
    assert inputs["images_per_sec_per_gpu"] == pytest.approx(fastest) and inputs["per_gpu_batch"] == 8


def test_a_second_result_of_the_day_does_not_overwrite_the_first(tmp_path):
    first = bench_report.output_path(tmp_path, "NVIDIA H100 80GB HBM3")
    assert re.fullmatch(r"nvidia-h100-80gb-hbm3-\d{4}-\d{2}-\d{2}\.json", first.name)
    first.write_text("{}")
    assert bench_report.output_path(tmp_path, "NVIDIA H100 80GB HBM3").name == first.stem + "-2.json"


@pytest.mark.parametrize("flags, message", [
    (["--batch", "0"], "--batch must be at least 4, not 0"),
    (["--batch", "5"], "give an even batch"),
    (["--image-size", "16"], "--image-size must be at least 32"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--data", "/nonexistent"], "--data /nonexistent is not a folder"),
    (["--data", "."], "train is missing"),
])
def test_bad_flags_are_one_line_errors(flags, message, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["bench", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megabatch: error: ") and err.count("\n") == 1 and message in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_without_a_gpu_is_a_one_line_error(capsys):
    assert main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
