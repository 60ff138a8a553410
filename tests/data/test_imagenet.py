"""The ImageNet folder source: layout checks, both decoders, deterministic augmentation,
unreadable images, and ResNet-50 end to end on a tiny ImageNet of real JPEGs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from megabatch import checkpoint
from megabatch.batching import BatchPlan, epoch_order
from megabatch.cli import main
from megabatch.data import imagenet, tiny_imagenet
from megabatch.errors import UserError

SIZE = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, fashion_dir):
    return tiny_imagenet.write(tmp_path_factory.mktemp("in") / "tiny", classes=4, train_per_class=16,
                               val_per_class=4, size=48)


def steps_of(source, plan, epoch=0, augment=True, device="cpu"):
    return [[(x.clone(), y.clone()) for x, y in step]
            for step in source.training_batches(plan.epoch(epoch_order(0, epoch, len(source)), epoch),
                                                0, augment, torch.device(device))]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device: nvJPEG is not run"))]


def test_classes_are_sorted_like_torchvision_imagefolder(tiny):
    train, val = imagenet.load(tiny, SIZE, 40, workers=0)
    reference = torchvision.datasets.ImageFolder(tiny / "train")
    assert list(train.classes) == reference.classes
    assert [(p, l) for p, l in train.samples] == [(p, l) for p, l in reference.samples]
    assert (len(train), len(val)) == (64, 16)


def test_layout_errors(tiny, tmp_path):
    with pytest.raises(UserError, match="train is missing"):
        imagenet.load(tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images"):
        imagenet.load(tmp_path)
    with pytest.raises(UserError, match="do not match train"):
        imagenet.scan_split(tiny / "val", ["n00000000", "zzz"])


@pytest.mark.parametrize("decoder", ["pil", "device"])
def test_training_batches_have_the_right_shape_and_normalization(tiny, decoder):
    train, _ = imagenet.load(tiny, SIZE, 40, decoder=decoder, workers=0)
    steps = steps_of(train, BatchPlan.create(32, 8, 16))
    assert len(steps) == 2 and len(steps[0]) == 2
    x, y = steps[0][0]
    assert x.shape == (16, 3, SIZE, SIZE) and x.dtype == torch.float32 and y.shape == (16,)
    assert -2.2 < x.min() < x.max() < 2.7  # ImageNet mean/std normalization of [0, 1] pixels


def test_augmentation_does_not_depend_on_processes_workers_or_micro_batch(tiny):
    one, _ = imagenet.load(tiny, SIZE, 40, workers=0)
    two_workers, _ = imagenet.load(tiny, SIZE, 40, workers=2)
    whole = torch.cat([x for step in steps_of(one, BatchPlan.create(32, 8, 8)) for x, _ in step])
    assert torch.equal(whole, torch.cat([x for step in steps_of(two_workers, BatchPlan.create(32, 8, 32))
                                         for x, _ in step]))
    shares = [steps_of(one, BatchPlan.create(32, 8, 8, processes=2, rank=r)) for r in (0, 1)]
    per_step = [torch.cat([x for x, _ in shares[0][s]] + [x for x, _ in shares[1][s]]) for s in range(2)]
    assert torch.equal(whole, torch.cat(per_step))
    assert not torch.equal(whole, torch.cat([x for step in steps_of(one, BatchPlan.create(32, 8, 8), epoch=1)
                                             for x, _ in step]))


def test_crop_boxes_stay_inside_and_follow_the_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = imagenet.crop_box(60, 80, g)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        assert 0.08 * 4800 * 0.9 <= h * w <= 4800
    assert imagenet.crop_box(10, 1000, g)[2:] == (10, 13)  # fallback: widest allowed aspect


@pytest.mark.parametrize("decoder", ["pil", "device"])
def test_unreadable_image_is_replaced_counted_and_named(tiny, tmp_path, decoder):
    import shutil

    copy = shutil.copytree(tiny, tmp_path / "copy")
    bad = sorted((copy / "train" / "n00000001").iterdir())[0]
    bad.write_bytes(b"\xff\xd8 this is not a JPEG")
    train, _ = imagenet.load(copy, SIZE, 40, decoder=decoder, workers=0)
    plan = BatchPlan.create(64, 8, 32)
    [step] = steps_of(train, plan)
    assert train.take_unreadable() == [str(bad)] and train.take_unreadable() == []
    # Reference: the same data set with the damaged file's entry pointing at the next file:
    # every place of the epoch's order holds its own file (the damaged one's place the next
    # file's image and label), cropped as at that place.
    index = [path for path, _ in train.samples].index(str(bad))
    substituted = list(train.samples)
    substituted[index] = train.samples[index + 1]
    reference = imagenet.ImageFolderSource(substituted, list(train.classes), SIZE, 40, decoder, workers=0)
    [expected] = steps_of(reference, plan)
    assert reference.take_unreadable() == []
    order = epoch_order(0, 0, len(train)).tolist()
    assert index in order
    for (x, y), (x_ref, _), places in zip(step, expected, (order[:32], order[32:])):
        assert y.tolist() == [substituted[i][1] for i in places]
        assert torch.equal(x, x_ref)


def truncated_batch(tiny, tmp_path):
    """Samples [class-2 image, truncated class-0 file, class-1 image, class-0 image]."""
    first = {c: sorted((tiny / "train" / f"n0000000{c}").iterdir()) for c in (0, 1, 2)}
    broken = tmp_path / "broken.JPEG"
    data = first[0][0].read_bytes()
    broken.write_bytes(data[:len(data) // 2])  # reads, but does not decode
    return [(str(first[2][0]), 2), (str(broken), 0), (str(first[1][0]), 1), (str(first[0][1]), 0)]


@pytest.mark.parametrize("decoder", ["pil", "device"])
def test_a_replaced_image_comes_with_its_own_label(tiny, tmp_path, decoder):
    samples = truncated_batch(tiny, tmp_path)
    source = imagenet.ImageFolderSource(samples, ["a", "b", "c"], SIZE, 40, decoder, workers=0)
    [(x, y)] = list(source.evaluation_batches(0, 3, 3, torch.device("cpu")))
    # The truncated file is replaced by the next readable file of the data set, the
    # class-1 image, pixels and label together (not the class-2 image under label 0).
    assert y.tolist() == [2, 1, 1]
    assert torch.equal(x[1], x[2]) and not torch.equal(x[1], x[0])
    assert source.take_unreadable() == [samples[1][0]]


def test_both_decoders_substitute_the_same_image_in_training(tiny, tmp_path):
    samples = truncated_batch(tiny, tmp_path)
    labels = {}
    for decoder in ("pil", "device"):
        source = imagenet.ImageFolderSource(samples, ["a", "b", "c"], SIZE, 40, decoder, workers=0)
        labels[decoder] = torch.cat([y for step in steps_of(source, BatchPlan.create(4, 4, 4)) for _, y in step])
        assert source.take_unreadable() == [samples[1][0]]
    order = epoch_order(0, 0, len(samples)).tolist()
    expected = [samples[2 if i == 1 else i][1] for i in order]  # file 1 -> file 2, label 1
    assert labels["pil"].tolist() == labels["device"].tolist() == expected


@pytest.mark.parametrize("decoder", ["pil", "device"])
def test_a_failing_transform_is_not_an_unreadable_image(tiny, decoder):
    # Every file is fine; image_size=0 makes the crop raise. That must surface as
    # the error it is, never as "no image of the data set can be read".
    train, _ = imagenet.load(tiny, 0, 40, decoder=decoder, workers=0)
    with pytest.raises(Exception) as raised:
        steps_of(train, BatchPlan.create(32, 8, 16))
    assert not isinstance(raised.value, UserError), raised.value
    assert train.take_unreadable() == []


def test_only_reading_and_decoding_errors_count(tiny, monkeypatch):
    train, _ = imagenet.load(tiny, SIZE, 40, workers=0)

    def buggy(self, image, item):
        raise ValueError("a bug in the transforms")

    monkeypatch.setattr(imagenet.FolderImages, "transform", buggy)
    with pytest.raises(ValueError, match="a bug in the transforms"):
        steps_of(train, BatchPlan.create(32, 8, 16))
    assert train.take_unreadable() == []


def test_resnet50_end_to_end_on_tiny_imagenet(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "paper-resnet50-imagenet-32k", "--data", str(tiny), "--out", str(out),
                 "--set", f"data.image_size={SIZE}", "--set", "data.resize_size=40", "--set", "data.workers=2",
                 "--set", "batch.global_batch=32", "--set", "batch.per_worker_batch=16",
                 "--set", "train.max_steps=2", "--set", "train.epochs=1"]) == 0
    printed = capsys.readouterr().out
    assert "64 training images, 2 steps/epoch" in printed
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["iteration"] == 2 and 0.0 <= metrics["test_top1"] <= 100.0
    state = checkpoint.load(out / "final.pt")
    model = torchvision.models.resnet50(num_classes=4)
    model.load_state_dict(state["model"], strict=True)
    assert main(["eval", "--checkpoint", str(out / "final.pt"), "--data", str(tiny)]) == 0
    assert f"top-1 {metrics['test_top1']:.2f}%" in capsys.readouterr().out


def test_a_folder_holds_out_validation_files_with_their_labels(tiny):
    from megabatch.data import hold_out

    train, _ = imagenet.load(tiny, SIZE, 40, workers=0)
    rest, held = hold_out(train, 8)
    assert (len(rest), len(held)) == (56, 8)
    assert sorted(rest.samples + held.samples) == sorted(train.samples)
    assert held.classes == train.classes and held.decoder == train.decoder


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("decoder", ["pil", "device"])
def test_odd_files_decode_and_damaged_ones_are_replaced(tiny, tmp_path, decoder, device):
    # What a real ImageNet copy holds (CMYK, greyscale, a PNG named .JPEG, tiny and large
    # images) trains; a truncated and an empty file are counted and replaced, nothing else;
    # with the device decoder on a GPU, by nvJPEG and its fallbacks.
    import shutil

    copy = shutil.copytree(tiny, tmp_path / "odd")
    odd = tiny_imagenet.add_odd_files(copy)
    train, _ = imagenet.load(copy, SIZE, 40, decoder=decoder, workers=0)
    assert len(train) == 64 + len(odd)
    steps = steps_of(train, BatchPlan.create(71, 71, 71), device=device)
    [[(x, y)]] = steps
    assert x.shape == (71, 3, SIZE, SIZE) and x.device.type == device and torch.isfinite(x).all()
    assert sorted(train.take_unreadable()) == sorted(str(odd[k]) for k in tiny_imagenet.ODD_UNREADABLE)
    # Evaluation (resize and center crop) reads every readable odd file too.
    readable = [(str(odd[k]), 0) for k in tiny_imagenet.ODD_READABLE]
    source = imagenet.ImageFolderSource(readable, list(train.classes), SIZE, 40, decoder, workers=0)
    [(x, y)] = list(source.evaluation_batches(0, len(readable), len(readable), torch.device(device)))
    assert x.shape == (5, 3, SIZE, SIZE) and source.take_unreadable() == []
    if device == "cpu":  # the two decoders give the same pixels, to 2 levels of 255
        other = imagenet.ImageFolderSource(readable, list(train.classes), SIZE, 40,
                                           {"pil": "device", "device": "pil"}[decoder], workers=0)
        [(x_other, _)] = list(other.evaluation_batches(0, len(readable), len(readable), torch.device("cpu")))
        assert other.take_unreadable() == []
        mean, std = torch.tensor(imagenet.MEAN).view(1, 3, 1, 1), torch.tensor(imagenet.STD).view(1, 3, 1, 1)
        levels = [(batch * std + mean) * 255 for batch in (x, x_other)]
        assert all(float((v - v.round()).abs().max()) < 1e-3 for v in levels)  # whole levels of 255
        difference = (levels[0] - levels[1]).abs().flatten(1).amax(1)
        assert difference.max() <= 2 + 1e-3, dict(zip(tiny_imagenet.ODD_READABLE, difference.tolist()))


def test_the_device_decoders_augmentation_costs_two_calls_per_image(tiny):
    # On a GPU the host launches each kernel of a micro-batch's crops, and the step already
    # waits on the host: per image only the crop's resize (and its conversion to float),
    # which sizes that differ keep apart; rounding and flips once per batch. The seeded
    # draws of the crop boxes run on the CPU and launch nothing.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        free = ("rand", "randint", "_local_scalar_dense", "slice", "select", "unsqueeze", "view", "lift_fresh")

        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.__name__.split(".")[0] not in self.free
            return func(*args, **(kwargs or {}))

    train, _ = imagenet.load(tiny, SIZE, 40, decoder="device", workers=0)
    images = [imagenet.decode_rgb(imagenet.read_bytes(path)) for path, _ in train.samples[:16]]
    calls = {}
    for n in (8, 16):
        with Calls() as counted:
            train._crops(images[:n], [imagenet.Item(i, 0, i) for i in range(n)], torch.device("cpu"))
        calls[n] = counted.count
    assert calls[16] - calls[8] == 2 * 8 and calls[8] - 2 * 8 <= 6


def test_the_script_writes_the_odd_files(tmp_path, fashion_dir, capsys):
    import runpy
    import sys

    out = tmp_path / "tiny"
    argv = ["make_tiny_imagenet.py", str(out), "--classes", "2", "--train-per-class", "2", "--val-per-class", "1",
            "--odd-files"]
    old, sys.argv = sys.argv, argv
    try:
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(Path(__file__).parents[2] / "scripts" / "make_tiny_imagenet.py"), run_name="__main__")
    finally:
        sys.argv = old
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "2 classes, 4 train + 2 val JPEGs" in printed and "7 odd files (cmyk, grey, png" in printed
    assert len(list((out / "train" / "n00000000").iterdir())) == 2 + 7


def test_damaged_pngs_never_crash_the_device_decoder(tmp_path):
    """torchvision's decode_image crashed the process (SIGSEGV, in libpng) on many PNGs
    with a few bytes flipped, in the training process itself; PIL refuses them. Decoded in
    a child process, so that a crash fails this test instead of ending the suite."""
    import subprocess
    import sys

    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    good = tmp_path / "good.png"
    Image.fromarray(torch.randint(0, 256, (44, 52, 3), dtype=torch.uint8, generator=rng).numpy()).save(good)
    data = good.read_bytes()
    for i in range(40):
        damaged = bytearray(data)
        for place in torch.randint(40, len(data), (4,), generator=rng).tolist():
            damaged[place] ^= 0xFF
        (tmp_path / f"{i}.png").write_bytes(bytes(damaged))
    code = ("import sys, pathlib; from megabatch.data import imagenet; "
            "print(sum(imagenet.decode_rgb(imagenet.read_bytes(str(p))) is None "
            "for p in sorted(pathlib.Path(sys.argv[1]).glob('[0-9]*.png'))))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 0 < int(result.stdout) <= 40  # refused, not crashed
    assert imagenet.decode_rgb(imagenet.read_bytes(str(good))).shape == (3, 44, 52)


def test_both_decoders_read_the_same_formats_and_pixels(tmp_path):
    """BMP, PPM, TIFF and a 16-bit PNG: what the "pil" decoder reads, the "device" decoder
    reads too, to the same pixels (it decodes every non-JPEG with PIL); a 16-bit image is
    scaled to 8 bits, not saturated to white."""
    from PIL import Image

    rng = torch.Generator().manual_seed(1)
    rgb = torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8, generator=rng).numpy()
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    for suffix in ("bmp", "ppm", "tif"):
        Image.fromarray(rgb).save(folder / f"0.{suffix}")
    deep = (torch.arange(40 * 40, dtype=torch.int32).view(40, 40) * 40).numpy().astype("uint16")
    Image.fromarray(deep).save(folder / "deep.png")  # values 0 .. 63,960 of 65,535
    samples = [(str(p), 0) for p in sorted(folder.iterdir())]
    batches = {}
    for decoder in ("pil", "device"):
        source = imagenet.ImageFolderSource(samples, ["a"], SIZE, 40, decoder, workers=0)
        [(x, _)] = list(source.evaluation_batches(0, len(samples), len(samples), torch.device("cpu")))
        assert source.take_unreadable() == []
        batches[decoder] = x
    assert torch.allclose(batches["pil"], batches["device"], atol=2 / 255 / 0.224)
    pixels = batches["pil"][samples.index((str(folder / "deep.png"), 0))] * 0.229 + 0.485  # red channel scale
    assert 0.3 < float(pixels[0].mean()) < 0.7  # about 127/255, not 1.0


def test_a_damaged_file_then_an_empty_one_is_replaced_by_the_next_readable(tiny, tmp_path):
    first = sorted((tiny / "train").iterdir())
    truncated, empty = tmp_path / "0.JPEG", tmp_path / "1.JPEG"
    data = next(first[0].iterdir()).read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    empty.write_bytes(b"")
    good = next(first[1].iterdir())
    samples = [(str(truncated), 0), (str(empty), 0), (str(good), 1)]
    for decoder in ("pil", "device"):
        source = imagenet.ImageFolderSource(samples, ["a", "b"], SIZE, 40, decoder, workers=0)
        [(x, y)] = list(source.evaluation_batches(0, 1, 1, torch.device("cpu")))
        assert y.tolist() == [1] and str(empty) in source.take_unreadable()


def test_a_data_set_that_cannot_be_read_says_so_from_a_worker_process(tmp_path):
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    for i in range(4):
        (folder / f"{i}.JPEG").write_bytes(b"")
    samples = [(str(p), 0) for p in sorted(folder.iterdir())]
    source = imagenet.ImageFolderSource(samples, ["a"], SIZE, 40, "pil", workers=2)
    with pytest.raises(UserError) as raised:
        list(source.evaluation_batches(0, 4, 4, torch.device("cpu")))
    assert str(raised.value) == (f"none of the 4 images under {tmp_path / 'train'} can be read "
                                 f"(e.g. {samples[0][0]}): check the files, or copy the data set again")


def test_the_seed_of_training_batches_draws_the_crops(tiny):
    train, _ = imagenet.load(tiny, SIZE, 40, workers=0)
    plan = BatchPlan.create(16, 8, 16)

    def first_step(seed):
        steps = train.training_batches(plan.epoch(epoch_order(0, 0, len(train)), 0), seed, True,
                                       torch.device("cpu"))
        return next(next(steps))[0]

    assert torch.equal(first_step(5), first_step(5)) and not torch.equal(first_step(5), first_step(6))


def test_a_flat_validation_folder_says_how_to_sort_it(tiny, tmp_path):
    import shutil

    (tmp_path / "val").mkdir()
    for i, path in enumerate(sorted((tiny / "val").rglob("*.JPEG"))[:3]):
        shutil.copy(path, tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    with pytest.raises(UserError, match="its images lie flat .* move each into the folder of its class"):
        imagenet.scan_split(tmp_path / "val", ["a"])
