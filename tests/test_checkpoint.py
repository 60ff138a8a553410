"""Checkpoints: atomic writes, safe loading, damaged files, rotation."""

from __future__ import annotations

import pytest
import torch

from megabatch import checkpoint
from megabatch.errors import UserError


class Payload:
    """Any object that is not a tensor or a plain value."""


def test_round_trip_and_no_temporary_files_left(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "iteration": 7, "recipe": {"a": [1.0, 2.0], "b": "x"}}
    path = checkpoint.save(state, tmp_path / "ckpt.pt")
    loaded = checkpoint.load(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["iteration"] == 7
    assert loaded["recipe"] == state["recipe"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = checkpoint.save({"v": torch.tensor(1)}, tmp_path / "ckpt.pt")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        checkpoint.save({"v": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["v"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_truncated_checkpoint_is_a_user_error(tmp_path):
    path = checkpoint.save({"w": torch.randn(1000)}, tmp_path / "ckpt.pt")
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(UserError, match="truncated or corrupt"):
        checkpoint.load(path)


def test_pickled_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Payload()}, path)
    with pytest.raises(UserError, match="refusing checkpoint"):
        checkpoint.load(path)


def test_listing_and_pruning(tmp_path):
    for it in (30, 5, 100, 12):
        checkpoint.save({"iteration": it}, checkpoint.step_path(tmp_path, it))
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "step-00000005.pt", "step-00000012.pt", "step-00000030.pt", "step-00000100.pt"]
    checkpoint.prune(tmp_path, 2)
    assert [checkpoint.load(p)["iteration"] for p in checkpoint.list_checkpoints(tmp_path)] == [30, 100]
    assert (tmp_path / "notes.txt").exists()
