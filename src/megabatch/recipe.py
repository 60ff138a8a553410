"""Recipes: typed dataclasses, one per component, loaded from TOML.

A recipe file has a top-level ``description`` (and optionally ``base``, the
name of a recipe it extends) and one table per component below. Every key is
checked against its type (:mod:`megabatch.typed`), which carries the allowed values
(``Literal``) and the valid range of numbers (``Annotated[int, AtLeast(1)]``): an
unknown key, a value of the wrong type, outside its choices or its range is a
one-line :class:`~megabatch.errors.UserError` naming the key. ``--set
section.key=value`` overrides any value after loading.

Hyperparameters are written independently of the batch size: the learning
rate is given per 256 images and multiplied by ``global_batch / 256``
(:attr:`Recipe.base_lr`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from megabatch import tomlfile
from megabatch.errors import UserError
from megabatch.typed import AtLeast, Count, Fraction, NonNegative, Positive, PositiveFloat, Range, build, derived


Arch = Literal["small-cnn", "resnet18", "resnet50"]
BNMode = Literal["moving_average", "last_batch"]
CommDtype = Literal["fp32", "fp16", "bf16"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]  # torch.compile's


def compile_label(compile: bool, mode: str) -> str:
    """"compiled", with torch.compile's mode where it is not the default; "" for eager."""
    if not compile:
        return ""
    return "compiled" + (f" ({mode})" if mode != "default" else "")


@dataclass
class ModelConfig:
    arch: Arch = "small-cnn"
    """Architecture: "small-cnn" (28x28 images), "resnet18" or "resnet50" (torchvision)."""
    bn: BNMode = "moving_average"
    """Evaluation statistics of batch norm: "moving_average" (PyTorch's default,
    momentum 0.1) or "last_batch" (the paper: last step's statistics, averaged over workers)."""
    zero_init_residual: bool = False
    """Start each residual block's last BN scale at zero (Goyal et al.; ResNets only)."""


@dataclass
class DataConfig:
    dataset: Literal["fashion-mnist", "synthetic", "imagenet"] = "fashion-mnist"
    """"fashion-mnist" (real data, idx files), "synthetic" (random images, for smoke tests)
    or "imagenet" (the folder layout train/<class>/*.JPEG, val/<class>/*.JPEG)."""
    path: str = ""
    """Folder of the data; empty means the default (Fashion-MNIST: /usr/share/datasets/fashion-mnist;
    ImageNet has none). The command line's --data DIR overrides it."""
    augment: bool = False
    """Random horizontal flip and translation by up to 2 pixels of the training images."""
    train_subset: Count = 0
    """Train on the first N training images only (0 = all): for quick runs and tests."""
    test_subset: Count = 0
    """Evaluate on the first N test images only (0 = all)."""
    validation_images: Count = 0
    """Hold out N of the training images as a validation set (0 = none): the run trains on
    the others, and every evaluation also reports val_top1, so that hyperparameters can be
    chosen without looking at the test set. The same N images for every run and seed (a
    fixed draw), taken after data.train_subset."""
    synthetic_size: list[Positive] = field(default_factory=lambda: [4096, 1024, 28, 1, 10])
    """Synthetic data only: train images, test images, image size, channels, classes."""
    image_size: Annotated[int, AtLeast(8)] = 224
    """ImageNet: side of the training crop and of the evaluation center crop."""
    resize_size: Annotated[int, AtLeast(8)] = 256
    """ImageNet: evaluation images are resized to this shorter side before the center crop."""
    decoder: Literal["auto", "pil", "device"] = "auto"
    """ImageNet: "pil" (DataLoader workers decode on the CPU), "device" (workers read bytes, JPEGs
    are decoded in batches on the training device: nvJPEG on a GPU) or "auto" (device on CUDA)."""
    workers: Count = 6
    """ImageNet: DataLoader worker processes per training process, at most the CPU count
    (0 = in the main process)."""


@dataclass
class BatchConfig:
    global_batch: Positive = 128
    """Images per optimizer step, over all workers."""
    per_worker_batch: Annotated[int, AtLeast(2)] = 32
    """Images per worker: each worker's batch-norm statistics come from this many images."""
    micro_batch: Count = 0
    """Images per forward pass on one device, a multiple of per_worker_batch. A memory and
    speed knob only: it changes the result only by floating-point rounding. 0 = automatic:
    at most 1024 images on a GPU and 256 on a CPU (where smaller passes stay in cache:
    1,206 against 977 images/s for the small CNN on one core), within the process's share
    of the batch; a value above the share means the share."""


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "rmsprop_warmup", "lars"] = "sgd"
    """"sgd" (momentum SGD), "rmsprop_warmup" (the paper's RMSprop warm-up) or "lars"
    (You et al. 2017: layer-wise trust ratio on top of momentum SGD)."""
    lr_per_256: PositiveFloat = 0.1
    """Learning rate for 256 images; the run uses lr_per_256 * global_batch / 256."""
    momentum: Fraction = 0.9
    """Momentum (mu1 in the paper)."""
    weight_decay: NonNegative = 1e-4
    """L2 weight decay, added to the gradient."""
    no_decay_bn_bias: bool = False
    """No weight decay on batch-norm parameters and biases."""
    rms_decay: Fraction = 0.99
    """rmsprop_warmup: decay of the squared-gradient average (mu2)."""
    eps: NonNegative = 1e-8
    """rmsprop_warmup: added to the root mean square."""
    rmsprop_lr: NonNegative = 3e-4
    """rmsprop_warmup: learning rate of the RMSprop phase (eta_RMSprop, not scaled by batch)."""
    alpha_center: NonNegative = 10.0
    """rmsprop_warmup: epoch at which alpha_sgd reaches 0.5 (beta_center)."""
    alpha_period: PositiveFloat = 5.0
    """rmsprop_warmup: length of the RMSprop-to-SGD transition in epochs (beta_period)."""
    trust_coefficient: PositiveFloat = 0.001
    """lars: the trust coefficient eta of the layer-wise learning rate."""
    trust_norm: Literal["gradient_plus_decay", "decayed_gradient"] = "gradient_plus_decay"
    """lars: the trust ratio's denominator: "gradient_plus_decay" (||grad|| + weight_decay ||w||:
    You et al.'s Algorithm 1, the MLPerf reference, timm) or "decayed_gradient" (the norm of
    the decayed gradient, as MoCo v3 and MAE compute it)."""


@dataclass
class ScheduleConfig:
    boundaries: list[NonNegative] = field(default_factory=lambda: [30.0, 60.0, 80.0])
    """Epochs at which the learning-rate factor changes."""
    factors: list[NonNegative] = field(default_factory=lambda: [1.0, 0.1, 0.01, 0.001])
    """Multiple of the base learning rate in each interval (one more than boundaries).
    The paper's slow start is [0.5, 0.075, 0.01, 0.001] at [40, 70, 85]."""
    warmup_epochs: NonNegative = 0.0
    """Linear warm-up from lr_per_256 (the small-batch rate) to the first phase over this
    many epochs (Goyal et al.: 5). 0 = none."""
    kind: Literal["piecewise", "polynomial"] = "piecewise"
    """"piecewise" (factors between boundaries) or "polynomial" (base * (1 - e/epochs)^power
    after the warm-up, as used with LARS)."""
    power: NonNegative = 2.0
    """Exponent of the polynomial decay."""
    unit: Literal["epoch", "step"] = "epoch"
    """Unit of boundaries, warmup_epochs, optimizer.alpha_center and optimizer.alpha_period:
    "epoch" or "step" (optimizer steps: for small data sets, where a large batch leaves
    only a few dozen steps per run)."""
    reference_epochs: NonNegative = 0.0
    """The training length the epoch-valued settings above are written for (e.g. the
    paper's 90). When train.epochs differs they are stretched by train.epochs /
    reference_epochs, so a 90-epoch schedule keeps its shape in a shorter budget.
    0 = no rescaling; ignored with unit = "step"."""


@dataclass
class TrainConfig:
    epochs: Positive = 90
    """Passes over the training set."""
    seed: Count = 0
    """Seed of the initialization, the data order and the augmentation."""
    label_smoothing: Annotated[float, Range(0.0, 1.0)] = 0.0
    """Label smoothing of the cross-entropy loss."""
    max_steps: Count = 0
    """Stop after this many optimizer steps (0 = no limit): for smoke tests."""
    eval_every: Positive = 1
    """Evaluate on the test set every N epochs (and always after the last)."""
    keep_checkpoints: Positive = 2
    """Keep the newest K checkpoints in the run directory."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """"auto" (CUDA if available, else CPU), "cpu" or "cuda"."""
    comm_dtype: CommDtype = "fp32"
    """Dtype of the gradient all-reduce: "fp32", "fp16" (the paper) or "bf16". Gradients are
    divided by the number of processes before the sum. A single process rounds its
    gradient through this dtype, as the all-reduce would."""
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    """Compute precision: "fp32", "bf16" (autocast), "fp16" (autocast with a gradient scaler)
    or "auto": bf16 where the device computes it natively (a CUDA GPU with bf16, a CPU with
    AVX512-BF16 or AMX), fp32 elsewhere (emulated bf16 on an AVX2 CPU is several times slower)."""
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    """"channels_last", "contiguous" or "auto" (channels-last: faster on GPUs and CPUs alike)."""
    compile: bool = False
    """Compile the model with torch.compile."""
    compile_mode: CompileMode = "default"
    """torch.compile's mode, with ``compile`` on: "reduce-overhead" records the step's kernels
    in CUDA graphs and replays them, which takes the host's launch cost out of a step that
    waits on its host (ResNet-50 at 256 on an H200 did); "max-autotune" also times kernel
    variants (much longer compilation). CUDA graphs need a GPU: on a CPU, "reduce-overhead"
    compiles as "default" does. With CUDA graphs, gradients stay allocated between steps
    (zeroed, not freed), so that micro-batches can add into them."""
    cudnn_benchmark: bool = True
    """On CUDA, let cuDNN time its convolution algorithms for the run's shapes and keep the
    fastest (``torch.backends.cudnn.benchmark``); false for runs that must repeat bitwise."""
    tf32: bool = False
    """On CUDA, let fp32 convolutions and matmuls run on TF32 tensor cores (10-bit mantissa
    products): faster on Ampere and later, not fp32. Off by default, so that "fp32" means
    the same arithmetic on every device (PyTorch's own default lets cuDNN's convolutions use
    TF32). Under bf16 or fp16 autocast it touches only what stays in fp32."""
    checkpoint_every: Count = 0
    """Also write a checkpoint every N optimizer steps (0 = only at epoch ends)."""
    tensorboard: bool = False
    """Also log loss, learning rate, alpha_sgd, images/s (every step) and the test metrics
    (every evaluation) as TensorBoard event files under RUN_DIR/tensorboard/
    (needs the package tensorboard: pip install 'megabatch[tensorboard]')."""
    noise_scale: bool = False
    """Measure the gradient noise scale B_simple (McCandlish et al. 2018) while training, from
    the micro-batches' gradients within each step: logged per epoch as noise_scale,
    grad_sq_norm and grad_trace_sigma. Needs at least two micro-batches per step."""


@dataclass
class Recipe:
    description: str = ""
    """One line saying what the recipe is for (shown by `megabatch recipes`)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = derived("")
    """The recipe's name or file; set by the loader."""

    @property
    def base_lr(self) -> float:
        """eta_base = lr_per_256 * global_batch / 256."""
        return self.optimizer.lr_per_256 * self.batch.global_batch / 256

    def validate(self) -> "Recipe":
        """Check values that types alone cannot; raises UserError naming the key."""
        b, d = self.batch, self.data
        if b.global_batch % b.per_worker_batch:
            raise UserError(f"batch.global_batch = {b.global_batch} is not divisible by "
                            f"batch.per_worker_batch = {b.per_worker_batch}: make it a multiple "
                            f"(workers x per_worker_batch)")
        if b.micro_batch % b.per_worker_batch:
            raise UserError(f"batch.micro_batch = {b.micro_batch} is not a multiple of "
                            f"batch.per_worker_batch = {b.per_worker_batch}: each forward pass must "
                            f"hold whole workers (or set 0 for automatic)")
        s = self.schedule
        if len(s.factors) != len(s.boundaries) + 1:
            raise UserError(f"schedule.factors needs {len(s.boundaries) + 1} values for "
                            f"{len(s.boundaries)} boundaries, got {len(s.factors)}")
        if s.boundaries != sorted(s.boundaries):
            raise UserError(f"schedule.boundaries must increase, got {s.boundaries}")
        if d.dataset == "imagenet" and d.resize_size < d.image_size:
            raise UserError(f"data.resize_size = {d.resize_size} is smaller than data.image_size = "
                            f"{d.image_size}: the evaluation crop must fit in the resized image")
        if self.train.compile_mode != "default" and not self.train.compile:
            raise UserError(f"train.compile_mode = {self.train.compile_mode!r} has no effect without "
                            f"train.compile = true: set both")
        if d.dataset == "synthetic" and len(d.synthetic_size) != 5:
            raise UserError("data.synthetic_size needs 5 values: train images, test images, "
                            "image size, channels, classes")
        return self


# --- loading ---------------------------------------------------------------------------

def builtin_names() -> list[str]:
    """Names of the recipes shipped in megabatch/recipes."""
    return tomlfile.builtin_names("recipes")


def _raw(name_or_path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The recipe's tables, with its ``base`` recipes merged underneath."""
    if name_or_path in seen:
        raise UserError(f"recipe {name_or_path} extends itself (base chain {' -> '.join(seen)})")
    data = tomlfile.read(name_or_path, "recipes", "recipe", " (`megabatch recipes` describes them)")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _raw(str(base), seen + (name_or_path,))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """``"optimizer.lr_per_256=0.2"`` -> (["optimizer", "lr_per_256"], 0.2).

    The value is read as a TOML value (numbers, booleans, lists, quoted strings);
    anything that is not valid TOML is taken as a plain string.
    """
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {assignment!r} must look like section.key=value")
    try:
        value = tomlfile.parse(f"v = {text.strip()}", "")["v"]
    except UserError:
        value = text.strip()
    return key.strip().split("."), value


def load(name_or_path: str, overrides: list[str] = (), values: dict[str, Any] | None = None) -> Recipe:
    """Load a built-in recipe by name or a TOML file, apply ``--set`` overrides (text, as
    typed), then ``values`` ({"train.precision": "bf16"}: values from code), validate."""
    data = _raw(name_or_path)
    pairs = [(parse_override(a), a) for a in overrides] + [((k.split("."), v), k) for k, v in (values or {}).items()]
    for (path, value), origin in pairs:
        table = data
        for part in path[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise UserError(f"--set {origin}: {part} is not a table")
        table[path[-1]] = value
    recipe = build(Recipe, data, "recipe")
    recipe.name = name_or_path
    return recipe.validate()


def from_dict(data: dict[str, Any]) -> Recipe:
    """Rebuild a recipe saved with :func:`to_dict` (e.g. in a checkpoint)."""
    data = dict(data)
    name = data.pop("name", "")
    recipe = build(Recipe, data, "recipe")
    recipe.name = name
    return recipe.validate()


def to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


# What a resumed run may change: where its data lives, how often it keeps, evaluates and
# logs, and how it runs on its machine, none of which changes the numbers it trains on.
RESUMABLE = frozenset({
    "name", "description", "data.path", "data.workers", "data.decoder", "train.keep_checkpoints",
    "train.checkpoint_every", "train.eval_every", "train.tensorboard", "train.device", "train.max_steps",
    "train.compile", "train.compile_mode", "train.cudnn_benchmark", "train.memory_format"})


def changes(before: Recipe, after: Recipe) -> list[str]:
    """"key old -> new" for each value of ``after`` that differs from ``before``, except
    those a resumed run may change (:data:`RESUMABLE`)."""
    def flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        return {key: value for k, v in table.items()
                for key, value in (flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}).items()}

    old, new = flat(to_dict(before)), flat(to_dict(after))
    return [f"{key} {tomlfile.value(old[key])} -> {tomlfile.value(new[key])}" for key in old
            if key not in RESUMABLE and old[key] != new[key]]


def to_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML that :func:`load` reads back to the same values."""
    data = to_dict(recipe)
    lines = [f"# resolved recipe (from {recipe.name})", f"description = {tomlfile.value(data.pop('description'))}"]
    data.pop("name")
    for section, table in data.items():
        lines += ["", f"[{section}]"] + [f"{k} = {tomlfile.value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def describe(name: str) -> str:
    """The one-line description of a built-in recipe."""
    return load(name).description
