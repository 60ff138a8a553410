"""Checkpoints: atomic writes, safe loading, damaged files, rotation, full disks,
non-finite weights, file permissions."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from megabatch import checkpoint
from megabatch.errors import CheckpointWriteError, NonFiniteCheckpoint, UserError


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
    with pytest.raises(CheckpointWriteError, match="disk full"):
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


class FullDisk:
    """A file on a disk that fills up after ``room`` bytes, as a small tmpfs does."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def torch_save_on_full_tmpfs(obj, f):
    """What torch.save raised on a 1.2 MB tmpfs: its zip writer's error, raised while
    handling the OSError of the write."""
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.mark.parametrize("failure", ["write", "torch.save"])
def test_full_disk_is_one_line_naming_the_last_good_checkpoint(tmp_path, monkeypatch, failure):
    folder = tmp_path / "checkpoints"
    good = checkpoint.save({"model": {"w": torch.randn(10)}}, checkpoint.step_path(folder, 10))
    if failure == "write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode), room=1000))
    else:
        monkeypatch.setattr(torch, "save", torch_save_on_full_tmpfs)
    with pytest.raises(CheckpointWriteError) as raised:
        checkpoint.save({"model": {"w": torch.randn(10_000)}}, checkpoint.step_path(folder, 20))
    message = str(raised.value)
    assert "\n" not in message and raised.value.exit_code != 0
    assert f"disk of {folder} is full" in message and "step-00000020.pt" in message
    assert f"the last good checkpoint is {good}" in message and "--resume" in message
    assert [p.name for p in folder.iterdir()] == [good.name]  # no partial or temporary file
    monkeypatch.undo()
    assert checkpoint.load(good)["model"]["w"].shape == (10,)


def test_full_disk_with_no_earlier_checkpoint_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", torch_save_on_full_tmpfs)
    with pytest.raises(CheckpointWriteError, match="no earlier checkpoint is in"):
        checkpoint.save({"model": {}}, tmp_path / "final.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_final_checkpoint_names_the_newest_step_checkpoint(tmp_path, monkeypatch):
    step = checkpoint.save({"model": {}}, checkpoint.step_path(tmp_path / "checkpoints", 10))
    final = checkpoint.save({"model": {}}, tmp_path / "final.pt")  # of an earlier, shorter run
    monkeypatch.setattr(torch, "save", torch_save_on_full_tmpfs)
    with pytest.raises(CheckpointWriteError, match=f"the last good checkpoint is {step};"):
        checkpoint.save({"model": {}}, final)
    step.unlink()
    step.parent.rmdir()
    with pytest.raises(CheckpointWriteError, match=r"the last good checkpoint is .*final\.pt \(its earlier version\)"):
        checkpoint.save({"model": {}}, final)


def test_errors_other_than_a_failed_write_are_raised_as_they_are(tmp_path, monkeypatch):
    def bug(obj, f):
        raise TypeError("cannot pickle this")

    monkeypatch.setattr(torch, "save", bug)
    with pytest.raises(TypeError, match="cannot pickle"):
        checkpoint.save({"model": {}}, tmp_path / "ckpt.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_model_with_non_finite_weights_is_never_written(tmp_path, bad):
    good = checkpoint.save({"model": {"conv.weight": torch.ones(3)}}, checkpoint.step_path(tmp_path, 1))
    weights = {"conv.weight": torch.tensor([1.0, bad, 2.0]), "bn.num_batches_tracked": torch.tensor(3)}
    with pytest.raises(NonFiniteCheckpoint) as raised:
        checkpoint.save({"model": weights, "iteration": 2}, checkpoint.step_path(tmp_path, 2))
    assert "conv.weight" in str(raised.value) and f"last good checkpoint is {good}" in str(raised.value)
    assert raised.value.exit_code == 1
    assert [p.name for p in tmp_path.iterdir()] == [good.name]


def test_a_non_finite_buffer_is_refused_too(tmp_path):
    with pytest.raises(NonFiniteCheckpoint, match="bn.running_var"):
        checkpoint.save({"model": {"bn.running_var": torch.full((2,), float("inf"))}}, tmp_path / "final.pt")
    assert list(tmp_path.iterdir()) == []


def test_evaluating_a_non_finite_checkpoint_is_an_error(tmp_path):
    path = tmp_path / "old.pt"  # as written before save refused them
    torch.save({"model": {"fc.bias": torch.tensor([0.0, float("nan")])}, "iteration": 2}, path)
    state = checkpoint.load(path)  # plain loading still reads it
    with pytest.raises(NonFiniteCheckpoint, match=r"old\.pt holds NaN or infinite weights \(fc\.bias\)"):
        checkpoint.check_finite(state, path)
    with pytest.raises(NonFiniteCheckpoint, match="use an earlier checkpoint"):
        checkpoint.load(path, require_finite=True)
    fine = checkpoint.save({"model": {"fc.bias": torch.zeros(2)}}, tmp_path / "fine.pt")
    assert checkpoint.load(fine, require_finite=True)["model"]["fc.bias"].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)],
                         ids=["022", "002", "077"])
def test_checkpoints_get_the_permissions_of_any_new_file(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = checkpoint.save({"model": {}}, tmp_path / "ckpt.pt")
        other = tmp_path / "other.txt"
        other.write_text("x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode == other.stat().st_mode & 0o777


@pytest.mark.parametrize("content", [b'name = "x"\n[batch]\nglobal_batch = 256\n', b"{}"])
def test_a_file_that_is_not_a_checkpoint_is_named_so(tmp_path, content):
    path = tmp_path / "recipe.toml"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"recipe\.toml is not a checkpoint"):
        checkpoint.load(path)


def test_a_torch_file_that_is_not_a_dict_is_not_a_checkpoint(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(UserError, match="is not a checkpoint"):
        checkpoint.load(tmp_path / "tensor.pt")


def test_the_rename_is_flushed_before_the_save_returns(tmp_path, monkeypatch):
    """Prune deletes older checkpoints after save returns: the new file's folder entry
    must be on disk by then, or a crash could keep the deletion and lose the rename."""
    synced = []
    real = checkpoint.sync_folder

    def record(folder):
        synced.append((folder, sorted(p.name for p in folder.iterdir())))
        real(folder)

    monkeypatch.setattr(checkpoint, "sync_folder", record)
    checkpoint.save({"v": torch.tensor(1)}, tmp_path / "new" / "step-00000001.pt")
    assert synced == [(tmp_path, ["new"]), (tmp_path / "new", ["step-00000001.pt"])]


def test_prune_ignores_what_is_not_a_checkpoint_file_and_reports_what_it_cannot_delete(tmp_path, monkeypatch):
    (tmp_path / "step-00000001.pt").mkdir()  # not a file: not a checkpoint
    for it in (2, 3, 4):
        checkpoint.save({"iteration": it}, checkpoint.step_path(tmp_path, it))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "step-00000002.pt", "step-00000003.pt", "step-00000004.pt"]

    def refuse(self, missing_ok=False):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "unlink", refuse)
    assert checkpoint.prune(tmp_path, 2) == ["step-00000002.pt (Permission denied)"]
    monkeypatch.undo()
    assert checkpoint.prune(tmp_path, 2) == [] and len(checkpoint.list_checkpoints(tmp_path)) == 2
