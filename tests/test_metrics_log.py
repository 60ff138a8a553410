"""metrics.jsonl as every reader sees it: a last line cut short is dropped, any other bad line named."""

from __future__ import annotations

import pytest

from megabatch import metrics_log
from megabatch.errors import UserError


def test_a_last_line_cut_short_is_dropped_and_said(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert metrics_log.read(path) == []
    path.write_text('{"epoch": 1, "test_top1": 80.5}\n{"epoch": 2, "te')
    heard = []
    assert metrics_log.read(path, heard.append) == [{"epoch": 1, "test_top1": 80.5}]
    assert heard == [f"dropping the last line of {path}: it was cut short"]


def test_a_bad_line_before_the_last_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n\nnot json\n{"epoch": 3}\n')
    with pytest.raises(UserError, match=f"{path}:2 is not a JSON line: remove or repair that line"):
        metrics_log.read(path)


def test_a_study_lists_an_unfinished_run_whose_last_line_was_cut(tmp_path):
    from megabatch.study.runner import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "iteration": 6}\n{"epoch": 2, "iter')
    assert read_metrics(tmp_path) == [{"epoch": 1, "iteration": 6}]
