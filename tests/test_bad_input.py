"""Bad input, as a table: what a user types, the exit status, and words of the one-line
error. The next bad value found is a row here, not a new test."""

from __future__ import annotations

import pytest
import torch

from megabatch import checkpoint, models
from megabatch.cli import main

TRAIN = ["train", "--recipe", "fashion-mnist-demo"]

ROWS = [
    # recipes: names, keys, types, choices, ranges, consistency
    (["train", "--recipe", "nope"], 2, "unknown recipe 'nope'"),
    (TRAIN + ["--set", "batch.sizes=3"], 2, "unknown recipe key batch.sizes"),
    (TRAIN + ["--set", "batch.global_batch=2050"], 2, "not divisible"),
    (TRAIN + ["--set", "batch.micro_batch=100"], 2, "not a multiple"),
    (TRAIN + ["--set", "batch.global_batch=-64"], 2, "batch.global_batch must be >= 1"),
    (TRAIN + ["--set", "batch.per_worker_batch=1"], 2, "batch.per_worker_batch must be >= 2"),
    (TRAIN + ["--set", "train.eval_every=0"], 2, "train.eval_every must be >= 1"),
    (TRAIN + ["--set", "train.max_steps=-1"], 2, "train.max_steps must be >= 0"),
    (TRAIN + ["--set", "train.checkpoint_every=-1"], 2, "train.checkpoint_every must be >= 0"),
    (TRAIN + ["--set", "train.keep_checkpoints=0"], 2, "train.keep_checkpoints must be >= 1"),
    (TRAIN + ["--set", "train.epochs=0"], 2, "train.epochs must be >= 1"),
    (TRAIN + ["--set", "train.label_smoothing=1.5"], 2, "train.label_smoothing must be in [0, 1]"),
    (TRAIN + ["--set", "data.workers=-1"], 2, "data.workers must be >= 0"),
    (TRAIN + ["--set", "data.train_subset=-5"], 2, "data.train_subset must be >= 0"),
    (TRAIN + ["--set", "data.validation_images=-1"], 2, "data.validation_images must be >= 0"),
    (TRAIN + ["--set", "data.train_subset=512", "--set", "data.validation_images=512"], 2,
     "data.validation_images = 512 leaves no training images out of 512"),
    (TRAIN + ["--set", "data.image_size=0"], 2, "data.image_size must be >= 8"),
    (TRAIN + ["--set", "data.synthetic_size=[64, 0, 28, 1, 10]"], 2, "data.synthetic_size[1] must be >= 1"),
    (TRAIN + ["--set", "optimizer.lr_per_256=0"], 2, "optimizer.lr_per_256 must be > 0"),
    (TRAIN + ["--set", "optimizer.lr_per_256=nan"], 2, "optimizer.lr_per_256 must be > 0, got nan"),
    (TRAIN + ["--set", "optimizer.momentum=1.0"], 2, "optimizer.momentum must be in [0, 1)"),
    (TRAIN + ["--set", "optimizer.weight_decay=-1e-4"], 2, "optimizer.weight_decay must be >= 0"),
    (TRAIN + ["--set", "optimizer.alpha_period=0"], 2, "optimizer.alpha_period must be > 0"),
    (TRAIN + ["--set", "optimizer.trust_norm=grad"], 2, "is not one of gradient_plus_decay"),
    (TRAIN + ["--set", "schedule.boundaries=[-1.0, 70.0, 85.0]"], 2, "schedule.boundaries[0] must be >= 0"),
    (TRAIN + ["--set", "train.precision=fp8"], 2, "train.precision = 'fp8' is not one of"),
    (TRAIN + ["--set", "train.tensorboard=1"], 2, "train.tensorboard must be bool"),
    (TRAIN + ["--set", "model.bn=sync"], 2, "model.bn = 'sync' is not one of"),
    (TRAIN + ["--set", "model.arch=resnet18"], 2, "model.arch = resnet18 takes 3-channel images, but the data has 1"),
    (["train", "--recipe", "paper-resnet50-imagenet-32k", "--set", "data.resize_size=200"], 2,
     "data.resize_size = 200 is smaller than data.image_size = 224"),
    # data
    (TRAIN + ["--data", "/nonexistent"], 2, "apt-get install dataset-fashion-mnist"),
    (["train", "--recipe", "paper-resnet50-imagenet-32k", "--data", "/x"], 2, "ImageNet folder /x/train is missing"),
    (["train", "--recipe", "paper-resnet50-imagenet-32k"], 2, "an ImageNet recipe needs --data DIR"),
    # files that are not (good) checkpoints
    (["eval", "--checkpoint", "/nonexistent.pt"], 2, "does not exist"),
    (["eval", "--checkpoint", "{recipe_file}"], 2, "is not a checkpoint"),
    (["eval", "--checkpoint", "{nan_checkpoint}"], 1, "holds NaN or infinite weights (0.weight)"),
    (["eval", "--checkpoint", "{truncated_checkpoint}"], 2, "truncated or corrupt"),
    (["eval", "--checkpoint", "{corrupt_checkpoint}"], 2, "fails its checksum); use an earlier checkpoint"),
    (["eval", "--checkpoint", "{state_dict}"], 2, "is a model's state_dict, not a megabatch checkpoint (no 'model', 'recipe'"),
    (["eval", "--checkpoint", "{tmp}"], 2, "is a folder: give a checkpoint file in it"),
    (["eval", "--checkpoint", "{misfit_checkpoint}"], 2, "do not fit the model (size mismatch for 16.weight"),
    (["noise-scale", "--recipe", "fashion-mnist-demo", "--checkpoint", "{misfit_checkpoint}"], 2,
     "give the recipe the checkpoint was trained with"),
    (["eval", "--checkpoint", "{good_checkpoint}", "--recompute-bn", "48"], 2,
     "--recompute-bn 48 is not a whole number of workers of 32 images"),
    (["eval", "--checkpoint", "{good_checkpoint}", "--recompute-bn", "-64"], 2,
     "--recompute-bn -64: give a number of training images"),
    (["eval", "--checkpoint", "{good_checkpoint}", "--recompute-bn", "60032"], 2,
     "the recipe has 60000 training images; ask for fewer"),
    # commands
    (["noise-scale", "--recipe", "fashion-mnist-demo", "--steps", "1"], 2, "--steps must be at least 2"),
    (["noise-scale", "--recipe", "fashion-mnist-demo", "--set", "batch.micro_batch=2048"], 2,
     "holds a single micro-batch"),
    (["schedule", "--recipe", "fashion-mnist-demo", "--epochs", "1,x"], 2, "comma-separated numbers"),
    (["schedule", "--recipe", "fashion-mnist-demo", "--epochs", "5,-1"], 2, "numbers of at least 0, e.g. 0,5,10.5"),
    (["train", "--resume", "/nonexistent-run"], 2, "is not a run directory"),
    (["train", "--resume", "{tmp}"], 2, "holds no complete checkpoint to resume from"),
    (["study", "--spec", "fashion-mnist-paper-budget", "--seeds", "0,x"], 2, "--seeds '0,x' must be comma-separated"),
    (["study", "--spec", "fashion-mnist-paper-budget", "--batches", ","], 2, "--batches ',' must be comma-separated whole"),
]


@pytest.fixture
def files(tmp_path):
    """Bad files to point commands at."""
    recipe_file = tmp_path / "recipe.toml"
    recipe_file.write_text('description = "not a checkpoint"\n')
    model = models.create("small-cnn", 10, 1)
    state = {"model": model.state_dict(), "recipe": {}, "iteration": 1, "epoch": 0}
    good = checkpoint.save(state, tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    nan = tmp_path / "nan.pt"
    state["model"]["0.weight"] = torch.full_like(state["model"]["0.weight"], float("nan"))
    torch.save(state, nan)  # as another tool (or an older megabatch) might have written it
    bare = tmp_path / "state_dict.pt"
    torch.save(model.state_dict(), bare)  # what a training script of one's own saves
    misfit = checkpoint.save({**state, "model": models.create("small-cnn", 5, 1).state_dict()}, tmp_path / "misfit.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(flipped(good))
    return {"recipe_file": recipe_file, "good_checkpoint": good, "nan_checkpoint": nan,
            "truncated_checkpoint": truncated, "tmp": tmp_path, "state_dict": bare, "misfit_checkpoint": misfit,
            "corrupt_checkpoint": corrupt}


def flipped(path) -> bytes:
    """The file's bytes with one byte flipped in the middle of its largest stored tensor."""
    import struct
    import zipfile

    data = bytearray(path.read_bytes())
    member = max(zipfile.ZipFile(path).infolist(), key=lambda info: info.file_size)
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
    start = member.header_offset + 30 + name_length + extra_length
    data[start + member.file_size // 2] ^= 0x40
    return bytes(data)


@pytest.mark.parametrize("argv, status, words", ROWS, ids=[" ".join(r[0][1:])[:60] for r in ROWS])
def test_bad_input_is_one_line_naming_the_problem(argv, status, words, files, tmp_path, capsys):
    argv = [a.format(**files) for a in argv]
    if argv[0] == "train" and "--resume" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    assert main(argv) == status
    err = capsys.readouterr().err
    assert err.startswith("megabatch: error: ") and err.count("\n") == 1, err
    assert words in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained
