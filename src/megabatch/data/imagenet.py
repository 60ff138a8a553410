"""ImageNet in its folder layout: ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``.

Classes are the sorted folder names, as ``torchvision.datasets.ImageFolder`` has
them. Training images get a random-resized crop and a horizontal flip,
evaluation images a resize to ``resize_size`` and a center crop; both are
normalized with the ImageNet mean and std on the training device.

Two decoders sit behind one interface (:class:`ImageFolderSource`):

* ``"pil"``: DataLoader workers decode and augment with PIL (any CPU);
* ``"device"``: workers only read the file bytes; the main process decodes the
  JPEGs of a micro-batch at once with ``torchvision.io.decode_jpeg`` on the
  training device (nvJPEG on a CUDA GPU) and crops and resizes there.

The random crop of each image is drawn from a generator seeded by (seed, epoch,
the image's position in the epoch), so it does not depend on the number of
processes, workers or the micro-batch. An image that cannot be read or decoded
is counted, replaced by the next readable image of the data set *with that
image's label* (both decoders make the same substitution), and reported after
the epoch: never a crash hours into a run, never silently. Only reading and
decoding errors count as unreadable images: an error of the transforms is a bug
or a bad setting and is raised as it is.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF

from megabatch.batching import StepIndices
from megabatch.errors import UserError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop defaults
# What reading or decoding a damaged file raises (PIL's UnidentifiedImageError and
# "image file is truncated" are OSErrors; some of its plugins raise SyntaxError or
# ValueError). Only these make an image "unreadable"; nothing else is caught.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def scan_split(folder: Path, classes: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) of every image under ``folder/<class>/``, classes sorted by name."""
    if not folder.is_dir():
        raise UserError(f"ImageNet folder {folder} is missing: --data must hold train/<class>/ and "
                        f"val/<class>/ folders of images")
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not found:
        flat = any(p.suffix.lower() in EXTENSIONS for p in folder.iterdir())
        raise UserError(f"{folder} has no class folders: expected {folder}/<class>/*.JPEG"
                        + ("; its images lie flat (as ILSVRC2012's validation set comes): move each into "
                           "the folder of its class, named as in train/" if flat else ""))
    if classes is not None and found != classes:
        extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise UserError(f"the classes of {folder} do not match train/: {len(missing)} missing "
                        f"(e.g. {missing[:3]}), {len(extra)} extra (e.g. {extra[:3]})")
    samples = []
    for label, name in enumerate(found):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in EXTENSIONS)
        if not files:
            raise UserError(f"class folder {folder / name} holds no images ({', '.join(EXTENSIONS)})")
        samples += [(str(p), label) for p in files]
    return samples, found


def crop_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """A random-resized-crop box (top, left, h, w): torchvision's algorithm, seeded."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * (SCALE[0] + (SCALE[1] - SCALE[0]) * torch.rand(1, generator=generator).item())
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(1, generator=generator).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height  # fallback: the central crop of the allowed aspect
    w, h = (width, round(width / RATIO[0])) if in_ratio < RATIO[0] else \
        (round(height * RATIO[1]), height) if in_ratio > RATIO[1] else (width, height)
    return (height - h) // 2, (width - w) // 2, h, w


def sample_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 10_000_019 + position) % (2**63))


@dataclass(frozen=True)
class Item:
    """What the loader asks for: an image index, and what seeds its augmentation: the run's
    seed, the epoch (-1: no augmentation) and the image's place in the epoch."""

    index: int
    epoch: int = -1
    position: int = -1
    seed: int = 0


class FolderImages(Dataset):
    """Reads (``"pil"``: and transforms) single images; unreadable ones are replaced."""

    def __init__(self, samples: list[tuple[str, int]], decoder: str, image_size: int, resize_size: int) -> None:
        self.samples, self.decoder = samples, decoder
        self.image_size, self.resize_size = image_size, resize_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: Item) -> tuple[torch.Tensor, int, list[str], Item]:
        """The image (``"device"``: its file's bytes), its label, the unreadable files
        skipped to find it, and ``item`` with the index of the file actually read."""
        bad = []
        for offset in range(len(self.samples)):
            index = (item.index + offset) % len(self.samples)
            path, label = self.samples[index]
            try:
                image = read_bytes(path) if self.decoder == "device" else read_rgb(path)
            except UNREADABLE:
                bad.append(path)
                continue
            if self.decoder == "pil":  # outside the try: a failing transform is not a bad file
                image = self.transform(image, item)
            return image, label, bad, replace(item, index=index)
        raise unreadable_data_set(self.samples)

    def transform(self, image: Image.Image, item: Item) -> torch.Tensor:
        if item.epoch < 0:
            image = TF.center_crop(TF.resize(image, self.resize_size), self.image_size)
        else:
            g = sample_generator(item.seed, item.epoch, item.position)
            top, left, h, w = crop_box(image.height, image.width, g)
            image = TF.resized_crop(image, top, left, h, w, [self.image_size] * 2)
            if torch.rand(1, generator=g).item() < 0.5:
                image = TF.hflip(image)
        return TF.pil_to_tensor(image)


def unreadable_data_set(samples: list[tuple[str, int]]) -> UserError:
    folder = Path(samples[0][0]).parent.parent
    return UserError(f"none of the {len(samples):,} images under {folder} can be read (e.g. {samples[0][0]}): "
                     "check the files, or copy the data set again")


def from_workers(batches: Iterable) -> Iterator:
    """A DataLoader's batches; a UserError raised in one of its worker processes keeps its
    own one-line message (the DataLoader re-raises it wrapped in the worker's traceback)."""
    try:
        yield from batches
    except UserError as e:
        text, marker = str(e), "UserError: "
        if "Original Traceback" not in text or marker not in text:
            raise
        raise UserError(text.rsplit(marker, 1)[1].strip().splitlines()[0]) from None


def read_bytes(path: str) -> torch.Tensor:
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


def read_rgb(path: str | io.BytesIO) -> Image.Image:
    """The decoded image (``convert`` loads the pixels, so damage shows here); 16-bit
    grey images are scaled to 8 bits first (PIL's own conversion saturates them)."""
    with Image.open(path) as image:
        if image.mode.startswith("I;16") or image.mode == "I":
            image = image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
        return image.convert("RGB")


def decode_rgb(data: torch.Tensor) -> torch.Tensor | None:
    """One image's bytes decoded on the CPU as the ``"pil"`` decoder decodes a file; None
    when they do not decode. (torchvision's own decode_image is not used: libpng's error
    path crashes the process on some damaged PNGs, and it reads fewer formats.)"""
    try:
        return TF.pil_to_tensor(read_rgb(io.BytesIO(data.numpy().tobytes())))
    except UNREADABLE:
        return None


def decode_on(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """One image's bytes decoded: a JPEG by torchvision on ``device`` (nvJPEG on a GPU),
    anything else, or a JPEG it refuses (CMYK), by PIL on the CPU; None when nothing can."""
    image = decode_jpeg_on(data, device) if data[:2].tolist() == [0xFF, 0xD8] else None
    return image if image is not None else decode_rgb(data)


def decode_jpeg_on(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """One JPEG's bytes decoded on ``device`` (nvJPEG on a GPU); None when it refuses them."""
    try:
        with decoders():
            return torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


@contextlib.contextmanager
def decoders() -> Iterator[None]:
    """torchvision's decoders without their deprecation warning: torchvision 0.29 points to
    TorchCodec, but decode_jpeg and decode_image still work, and the user chose nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def collate(batch: list) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor, list[str], list[Item]]:
    """The loader's batch: ``"pil"`` images stacked here, in the worker (and then pinned),
    not in the training process; ``"device"`` file bytes (of any length) as a list."""
    images, labels, bad, items = zip(*batch)
    same = all(i.shape == images[0].shape and i.dim() == 3 for i in images)
    return (torch.stack(images) if same else list(images)), torch.tensor(labels), \
        [p for paths in bad for p in paths], list(items)


class ImageFolderSource:
    """An ImageNet split as a source of micro-batches for the trainer."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], image_size: int = 224,
                 resize_size: int = 256, decoder: str = "pil", workers: int = 4) -> None:
        self.samples, self.classes = samples, tuple(classes)
        self.image_size, self.resize_size, self.decoder, self.workers = image_size, resize_size, decoder, workers
        self.images = FolderImages(samples, decoder, image_size, resize_size)
        self.unreadable: list[str] = []  # since the last report
        self.channels = 3

    def __len__(self) -> int:
        return len(self.samples)

    def _loader(self, items) -> Iterator:
        return from_workers(DataLoader(self.images, batch_sampler=items, num_workers=self.workers, collate_fn=collate,
                                       pin_memory=torch.cuda.is_available(), persistent_workers=False,
                                       prefetch_factor=4 if self.workers else None))

    def _to_device(self, images: torch.Tensor | list[torch.Tensor], labels: torch.Tensor, bad: list[str],
                   items: list[Item], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        self.unreadable += bad
        if self.decoder == "device":
            decoded, labels = self._decode_all(images, labels, items, device)
            x = self._crops(decoded, items, device)
        else:  # stacked by the loader's worker (collate)
            x = (images if isinstance(images, torch.Tensor) else torch.stack(images)).to(device, non_blocking=True)
        # (torch.tensor(..., device=cuda) would be a blocking copy: the host waiting for the GPU)
        mean = torch.tensor(MEAN).view(1, 3, 1, 1).to(device, non_blocking=True)
        std = torch.tensor(STD).view(1, 3, 1, 1).to(device, non_blocking=True)
        return (x.to(torch.get_default_dtype()) / 255.0 - mean) / std, labels.to(device, non_blocking=True)

    def _decode_all(self, data: list[torch.Tensor], labels: torch.Tensor, items: list[Item],
                    device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Decode a micro-batch at once; if that fails, image by image, replacing any
        file that does not decode as the ``"pil"`` decoder does: by the next readable
        image of the data set, with its own label (and counting the bad file)."""
        try:
            with decoders():
                return torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB,
                                                  device=device), labels
        except RuntimeError:  # a PNG, a CMYK JPEG or a damaged file in the batch
            pass
        decoded, labels = [], labels.clone()
        for i, (d, item) in enumerate(zip(data, items)):
            image = decode_on(d, device)
            if image is None:
                image, labels[i] = self._next_decodable(item.index)
            decoded.append(image.to(device))
        return decoded, labels

    def _next_decodable(self, index: int) -> tuple[torch.Tensor, int]:
        """The image and label of the first file after ``index`` (which did not decode)
        that reads and decodes; ``index`` and the files passed over count as unreadable."""
        self.unreadable.append(self.samples[index][0])
        for offset in range(1, len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                image = decode_rgb(read_bytes(path))
            except UNREADABLE:  # an empty file raises ValueError
                image = None
            if image is not None:
                return image, label
            self.unreadable.append(path)
        raise unreadable_data_set(self.samples)

    def _crops(self, images: list[torch.Tensor], items: list[Item], device: torch.device) -> torch.Tensor:
        """The micro-batch's decoded images cropped and resized as the ``"pil"`` decoder does
        (training: a random-resized crop and a flip; evaluation: resize, center crop), with
        the uint8 values it gives. Images differ in size, so each one's crop and resize is its
        own call; the rounding and the flips then run once over the whole batch (on a GPU,
        two kernels per image and a few per batch: the host launches them all)."""
        if items[0].epoch < 0:  # evaluation, or training without augmentation
            return torch.stack([TF.center_crop(TF.resize(image, self.resize_size, antialias=True),
                                               [self.image_size] * 2) for image in images])
        crops, flips = [], []
        for image, item in zip(images, items):
            g = sample_generator(item.seed, item.epoch, item.position)
            top, left, h, w = crop_box(image.shape[-2], image.shape[-1], g)
            crops.append(F.interpolate(image[None, :, top:top + h, left:left + w].float(),
                                       size=[self.image_size] * 2, mode="bilinear", antialias=True,
                                       align_corners=False)[0])
            flips.append(torch.rand(1, generator=g).item() < 0.5)
        x = torch.stack(crops)
        del crops  # (the float crops: four times the batch's uint8 size)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
        flip = torch.tensor(flips).view(-1, 1, 1, 1).to(device, non_blocking=True)
        return torch.where(flip, x.flip(-1), x)

    def training_batches(self, steps: Iterable[StepIndices], seed: int, augment: bool,
                         device: torch.device) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
        """For every step, this process's micro-batches; one DataLoader streams the whole
        epoch, so its workers read ahead across steps. Each image's crop is drawn from
        (seed, epoch, its place in the epoch), whatever the processes or micro-batches."""
        steps = list(steps)
        items = [[Item(int(index), step.epoch if augment else -1,
                       step.position + part.start + j, seed) for j, index in enumerate(indices.tolist())]
                 for step in steps for part, indices in step.micro_batches]
        loader = iter(self._loader(items))
        for step in steps:
            yield (self._to_device(*next(loader), device) for _ in step.micro_batches)

    def evaluation_batches(self, first: int, last: int, batch_size: int,
                           device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        items = [[Item(i) for i in range(s, min(s + batch_size, last))] for s in range(first, last, batch_size)]
        for batch in self._loader(items):
            yield self._to_device(*batch, device)

    def take_unreadable(self) -> list[str]:
        """The unreadable files met since the last call (each replaced by a readable one)."""
        bad, self.unreadable = self.unreadable, []
        return bad

    def subset(self, n: int) -> "ImageFolderSource":
        if n <= 0 or n >= len(self):
            return self
        step = len(self) / n  # spread over the classes (the files are sorted by class)
        return self.select([int(i * step) for i in range(n)])

    def select(self, indices: Sequence[int]) -> "ImageFolderSource":
        """The files at ``indices``, in that order."""
        return ImageFolderSource([self.samples[i] for i in indices], list(self.classes), self.image_size,
                                 self.resize_size, self.decoder, self.workers)


def load(root: str | Path, image_size: int = 224, resize_size: int = 256, decoder: str = "pil",
         workers: int = 4) -> tuple[ImageFolderSource, ImageFolderSource]:
    """Training and validation sources of an ImageNet-layout folder."""
    root = Path(root)
    train, classes = scan_split(root / "train")
    val, _ = scan_split(root / "val", classes)
    return (ImageFolderSource(train, classes, image_size, resize_size, decoder, workers),
            ImageFolderSource(val, classes, image_size, resize_size, decoder, workers))
