"""``megabatch simulate``: predict time, throughput and scaling efficiency of a run.

Starts from a hardware preset (``--preset``, see :mod:`megabatch.simulate.hardware`)
and lets a flag override each of its figures. The model is
:mod:`megabatch.simulate.perfmodel`; docs/performance-model.md has the equations,
the sources and how the predictions compare with published records.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from megabatch.errors import UserError
from megabatch.simulate import hardware, perfmodel


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` flags to ``parser`` (a subcommand's parser)."""
    add = parser.add_argument
    add("--preset", default="mn1", metavar="NAME",
        help=f"hardware preset: {', '.join(hardware.PRESETS)} (mn1)")
    add("--gpus", type=int, metavar="N", help="number of GPUs (preset: its cluster size)")
    add("--gpus-per-node", type=int, metavar="N", help="GPUs in one node")
    add("--images-per-sec-per-gpu", type=float, metavar="X",
        help="training images/s of one GPU alone at --per-gpu-batch")
    add("--from-bench", metavar="FILE.json",
        help="take the per-GPU images/s from a `megabatch bench` result")
    add("--bench-entry", metavar="NAME", help="train_step entry of --from-bench (the fastest)")
    add("--per-gpu-batch", type=int, metavar="N", help="images per GPU per step")
    add("--model", default="resnet50", metavar="NAME|COUNT",
        help=f"{', '.join(hardware.MODELS)}, or a parameter count (resnet50)")
    add("--comm-dtype", metavar="DTYPE", help="gradient dtype on the wire: fp32, fp16 or bf16")
    add("--allreduce", metavar="ALGORITHM", help="ring, hierarchical or 2d-torus")
    add("--intra-node-gbps", type=float, metavar="X",
        help="per-GPU ring bandwidth inside a node, Gbit/s")
    add("--inter-node-gbps", type=float, metavar="X",
        help="a node's network bandwidth, all adapters, Gbit/s")
    add("--latency-us", type=float, metavar="X", help="latency of one all-reduce step across nodes, us")
    add("--intra-latency-us", type=float, metavar="X",
        help="latency of one all-reduce step inside a node, us")
    add("--overlap", type=float, metavar="F",
        help="share of backward the all-reduce can hide behind, 0 to 1 (0: after backward)")
    add("--overhead-ms", type=float, metavar="X",
        help="per-step cost of distribution, ms (default: copying gradients to the "
             "communication buffer and back at the device's memory bandwidth)")
    add("--input-images-per-sec-per-node", type=float, metavar="X",
        help="what a node's input pipeline delivers (default: never the limit)")
    add("--epochs", type=float, metavar="E", default=90.0, help="epochs (90)")
    add("--dataset-size", type=int, metavar="N", default=hardware.IMAGENET_TRAIN,
        help=f"training images ({hardware.IMAGENET_TRAIN:,}, ImageNet-1k)")
    add("--epoch-boundary", default="wrap", metavar="MODE",
        help="wrap: the loader runs on into the next epoch (Chainer); partial: a smaller "
             "last step per epoch; drop: skip it (wrap)")
    add("--eval-every", type=float, metavar="E", default=0.0,
        help="evaluate every this many epochs; 0: evaluation not counted (0)")
    add("--val-size", type=int, metavar="N", default=hardware.IMAGENET_VAL,
        help="validation images (50,000)")
    add("--sweep-gpus", metavar="N,N,...", help="predict for each GPU count, e.g. 1,8,64,512,1024")
    add("--plot", metavar="FILE.png", help="with --sweep-gpus: draw efficiency and time per GPU count")
    add("--json", action="store_true", help="print a JSON object instead of the table")
    add("--sources", action="store_true", help="print every input with its source and exit")


@dataclass(frozen=True)
class Inputs:
    """Every figure the model needs, after the flags have overridden the preset."""

    title: str
    gpus: int
    gpus_per_node: int
    images_per_sec_per_gpu: float
    per_gpu_batch: int
    model: str
    parameters: int
    comm_dtype: str
    allreduce: str
    intra_node_gbps: float
    inter_node_gbps: float
    intra_latency_us: float
    latency_us: float
    memory_gbs: float
    overlap: float
    overhead_ms: float
    input_images_per_sec_per_node: float | None
    epochs: float
    dataset_size: int
    epoch_boundary: str
    eval_every: float
    val_size: int

    @property
    def grad_bytes(self) -> int:
        return self.parameters * perfmodel.BYTES_PER_ELEMENT[self.comm_dtype]

    def network(self) -> perfmodel.Network:
        return perfmodel.Network(
            gpus_per_node=self.gpus_per_node,
            intra_node_bw=self.intra_node_gbps * 1e9 / 8, inter_node_bw=self.inter_node_gbps * 1e9 / 8,
            intra_latency=self.intra_latency_us * 1e-6, inter_latency=self.latency_us * 1e-6)

    def workload(self) -> perfmodel.Workload:
        return perfmodel.Workload(
            per_gpu_batch=self.per_gpu_batch, images_per_s=self.images_per_sec_per_gpu,
            grad_bytes=self.grad_bytes, overlap=self.overlap, overhead_s=self.overhead_ms / 1e3,
            input_images_per_s_per_node=self.input_images_per_sec_per_node)

    def schedule(self) -> perfmodel.Schedule:
        return perfmodel.Schedule(self.epochs, self.dataset_size, self.epoch_boundary,
                                  self.eval_every, self.val_size)


def run(args: argparse.Namespace) -> int:
    """Print the prediction (table or --json), write --plot; 0 on success."""
    inputs, sources = resolve(args)
    if args.sources:
        print(json.dumps(sources, indent=2) if args.json else _sources_table(inputs, sources))
        return 0
    counts = _gpu_counts(args.sweep_gpus) if args.sweep_gpus else [inputs.gpus]
    for gpus in counts:
        _check_split(gpus, inputs)
    try:
        predictions = [perfmodel.predict(inputs.workload(), inputs.network(), gpus,
                                         inputs.allreduce, inputs.schedule()) for gpus in counts]
    except ValueError as err:
        raise UserError(f"{err}; use fewer GPUs, a smaller batch or --epoch-boundary wrap") from None
    if args.plot:
        _plot(predictions, inputs.title, args.plot)
    if args.json:
        objects = [{**p.as_dict(), "inputs": {**asdict(inputs), "gpus": p.gpus}} for p in predictions]
        print(json.dumps({"sweep": objects} if args.sweep_gpus else objects[0], indent=2))
    elif args.sweep_gpus:
        print(_sweep_table(inputs, predictions))
    else:
        print(_table(inputs, predictions[0]))
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def resolve(args: argparse.Namespace) -> tuple[Inputs, dict[str, dict]]:
    """Merge the preset and the flags into :class:`Inputs`; also say where each came from."""
    preset = hardware.PRESETS.get(args.preset)
    if preset is None:
        raise UserError(f"unknown preset {args.preset!r}: choose one of {', '.join(hardware.PRESETS)}")
    values = {name: figure.value for name, figure in preset.figures().items()}
    sources = {name: figure.source for name, figure in preset.figures().items()}
    bench_batch = None
    if args.from_bench:
        if args.images_per_sec_per_gpu is not None:
            raise UserError("give --from-bench or --images-per-sec-per-gpu, not both")
        values["images_per_sec_per_gpu"], sources["images_per_sec_per_gpu"], bench_batch = \
            read_bench(args.from_bench, args.bench_entry)
        if bench_batch is not None and args.per_gpu_batch is None:
            values["per_gpu_batch"], sources["per_gpu_batch"] = bench_batch, args.from_bench
    for name in values:
        flag = getattr(args, name, None)
        if flag is not None:
            values[name], sources[name] = flag, f"--{name.replace('_', '-')}"
    parameters, sources["parameters"] = _parameters(args.model)
    comm = values["comm_dtype"]
    if comm not in perfmodel.BYTES_PER_ELEMENT:
        raise UserError(f"unknown --comm-dtype {comm!r}: choose fp32, fp16 or bf16")
    overhead = args.overhead_ms
    if overhead is None:
        overhead = 1e3 * perfmodel.pack_overhead(parameters, comm, values["memory_gbs"] * 1e9)
        sources["overhead_ms"] = "gradient copy to and from the buffer at memory_gbs"
    else:
        sources["overhead_ms"] = "--overhead-ms"
    inputs = Inputs(
        title=preset.title, model=args.model, parameters=parameters, overhead_ms=overhead,
        epochs=args.epochs, dataset_size=args.dataset_size, epoch_boundary=args.epoch_boundary,
        eval_every=args.eval_every, val_size=args.val_size,
        **{name: values[name] for name in values})
    _validate(inputs)
    return inputs, {name: {"value": getattr(inputs, name), "source": source}
                    for name, source in sources.items()}


def read_bench(path: str, entry: str | None) -> tuple[float, str, int | None]:
    """(images/s, its source, batch or None) from a ``megabatch bench`` JSON result:
    ``{"device": str, "train_step": [{"name": str, "images_per_s": float, ...}]}``;
    the fastest entry unless ``entry`` names one; an entry's ``batch_size`` is optional."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise UserError(f"cannot read --from-bench {path}: {err.strerror}; "
                        "give the JSON file `megabatch bench` wrote") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"--from-bench {path} is not JSON; "
                        "give the file `megabatch bench` wrote") from None
    steps = data.get("train_step") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("device"), str) \
            or not isinstance(steps, list) or not steps:
        raise UserError(f"--from-bench {path} is not a megabatch bench result: expected an "
                        "object with \"device\" and a non-empty \"train_step\" list")
    for step in steps:
        speed = step.get("images_per_s") if isinstance(step, dict) else None
        if not isinstance(step, dict) or not isinstance(step.get("name"), str) \
                or isinstance(speed, bool) or not isinstance(speed, (int, float)) or not speed > 0:
            raise UserError(f"--from-bench {path}: every train_step entry needs a \"name\" "
                            "and a positive \"images_per_s\"")
    if entry is None:
        chosen = max(steps, key=lambda step: step["images_per_s"])
    else:
        chosen = next((step for step in steps if step["name"] == entry), None)
        if chosen is None:
            names = ", ".join(step["name"] for step in steps)
            raise UserError(f"--bench-entry {entry!r} is not in {path}: choose one of {names}")
    batch = chosen.get("batch_size")
    batch = batch if isinstance(batch, int) and not isinstance(batch, bool) and batch > 0 else None
    return float(chosen["images_per_s"]), f"{path}: {chosen['name']} on {data['device']}", batch


def _parameters(model: str) -> tuple[int, str]:
    if model in hardware.MODELS:
        return hardware.MODELS[model], f"{model} as torchvision builds it"
    try:
        count = float(model)
    except ValueError:
        count = None
    if count is None or not count >= 1 or count != int(count):
        raise UserError(f"unknown --model {model!r}: give one of {', '.join(hardware.MODELS)} "
                        "or a parameter count such as 25557032")
    return int(count), "--model"


def _validate(inputs: Inputs) -> None:
    def flag(name: str) -> str:
        return f"--{name.replace('_', '-')} must be"

    positive = ["gpus", "gpus_per_node", "images_per_sec_per_gpu", "per_gpu_batch",
                "intra_node_gbps", "inter_node_gbps", "memory_gbs", "epochs", "dataset_size",
                "val_size"]
    for name in positive:
        if not getattr(inputs, name) > 0:
            raise UserError(f"{flag(name)} positive, not {getattr(inputs, name)}")
    for name in ["intra_latency_us", "latency_us", "overhead_ms", "eval_every"]:
        if not getattr(inputs, name) >= 0:
            raise UserError(f"{flag(name)} zero or more, not {getattr(inputs, name)}")
    if not 0 <= inputs.overlap <= 1:
        raise UserError(f"--overlap is a share of the backward pass, 0 to 1, not {inputs.overlap}")
    loader = inputs.input_images_per_sec_per_node
    if loader is not None and not loader > 0:
        raise UserError(f"{flag('input_images_per_sec_per_node')} positive, not {loader}")
    if inputs.allreduce not in perfmodel.ALGORITHMS:
        raise UserError(f"unknown --allreduce {inputs.allreduce!r}: "
                        "choose ring, hierarchical or 2d-torus")
    if inputs.epoch_boundary not in perfmodel.EPOCH_BOUNDARIES:
        raise UserError(f"unknown --epoch-boundary {inputs.epoch_boundary!r}: "
                        "choose wrap, partial or drop")


def _check_split(gpus: int, inputs: Inputs) -> None:
    per_node = inputs.gpus_per_node
    if inputs.allreduce != "ring" and gpus > per_node and gpus % per_node:
        raise UserError(f"{inputs.allreduce} all-reduce needs whole nodes: {gpus} GPUs is not a "
                        f"multiple of --gpus-per-node {per_node}; change either, or use ring")


def _gpu_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UserError(f"--sweep-gpus {text!r}: give positive whole numbers, e.g. 1,8,64,512,1024")
    return counts


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f} ms"


def _duration(seconds: float) -> str:
    return f"{seconds:,.1f} s ({seconds / 60:,.1f} min)" if seconds < 86400 else \
        f"{seconds:,.0f} s ({seconds / 3600:,.1f} h)"


def _header(inputs: Inputs) -> list[str]:
    return [
        inputs.title,
        f"  per-GPU batch       {inputs.per_gpu_batch} images, "
        f"{inputs.images_per_sec_per_gpu:,.1f} images/s on one GPU alone",
        f"  gradients           {inputs.model}: {inputs.parameters:,} parameters x "
        f"{inputs.comm_dtype} = {inputs.grad_bytes / 1e6:.1f} MB",
        f"  all-reduce          {inputs.allreduce}, {inputs.overlap:.0%} of backward can hide it",
        f"  links               in a node {inputs.intra_node_gbps / 8:.1f} GB/s per GPU and "
        f"{inputs.intra_latency_us:g} us/step, across nodes {inputs.inter_node_gbps / 8:.1f} GB/s "
        f"per node and {inputs.latency_us:g} us/step",
        f"  run                 {inputs.epochs:g} epochs of {inputs.dataset_size:,} images "
        f"({inputs.epoch_boundary} at epoch ends"
        + (f", evaluation every {inputs.eval_every:g} epochs)" if inputs.eval_every else ")"),
    ]


def _table(inputs: Inputs, pred: perfmodel.Prediction) -> str:
    step = pred.step
    lines = _header(inputs) + [
        f"  GPUs                {pred.gpus} = {pred.nodes} node(s) x "
        f"{min(pred.gpus, inputs.gpus_per_node)}, global batch "
        f"{pred.gpus * inputs.per_gpu_batch:,}, {pred.steps:,} steps",
        "",
        f"  step           {_ms(step.total_s)}",
        f"    compute      {_ms(step.compute_s)}",
        f"    all-reduce   {_ms(step.allreduce_exposed_s)}   not hidden behind backward, "
        f"of {step.allreduce_s * 1e3:.1f} ms",
        f"    overhead     {_ms(step.overhead_s)}",
        f"    input wait   {_ms(step.input_wait_s)}",
        f"  epoch          {_duration(pred.epoch_time_s)}",
        f"  total          {_duration(pred.total_time_s)}"
        + (f", of which evaluation {pred.eval_time_s:,.1f} s" if pred.eval_time_s else ""),
        f"  throughput     {pred.images_per_s:,.0f} images/s",
        f"  scaling efficiency  {pred.efficiency_vs_1gpu:.1%} vs 1 GPU, "
        f"{_percent(pred.efficiency_vs_1node)} vs 1 node of {inputs.gpus_per_node}",
    ]
    return "\n".join(lines)


def _sweep_table(inputs: Inputs, predictions: list[perfmodel.Prediction]) -> str:
    lines = _header(inputs) + ["", "   GPUs  nodes    step ms  all-reduce ms  not hidden ms"
                               "     images/s  eff 1 GPU  eff node      total"]
    for p in predictions:
        lines.append(f"  {p.gpus:5d}  {p.nodes:5d}  {p.step.total_s * 1e3:9.1f}  "
                     f"{p.step.allreduce_s * 1e3:13.1f}  {p.step.allreduce_exposed_s * 1e3:13.1f}  "
                     f"{p.images_per_s:11,.0f}  {p.efficiency_vs_1gpu:9.1%}  "
                     f"{_percent(p.efficiency_vs_1node):>8}  {_short(p.total_time_s):>9}")
    return "\n".join(lines)


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.1%}"


def _short(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _sources_table(inputs: Inputs, sources: dict[str, dict]) -> str:
    lines = [inputs.title]
    for name, entry in sources.items():
        value = entry["value"]
        value = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"  {name:30} {value:>10}  {entry['source']}")
    return "\n".join(lines)


def _plot(predictions: list[perfmodel.Prediction], title: str, path: str) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from None
    gpus = [p.gpus for p in predictions]
    figure = Figure(figsize=(10, 4))
    left, right = figure.subplots(1, 2)
    left.plot(gpus, [100 * p.efficiency_vs_1gpu for p in predictions], "o-", label="vs 1 GPU")
    nodes = [p for p in predictions if p.efficiency_vs_1node is not None]
    left.plot([p.gpus for p in nodes], [100 * p.efficiency_vs_1node for p in nodes], "s--",
              label="vs 1 node")
    left.set(xscale="log", ylim=(0, 105), xlabel="GPUs", ylabel="scaling efficiency (%)")
    left.legend()
    right.plot(gpus, [p.total_time_s / 60 for p in predictions], "o-")
    right.set(xscale="log", yscale="log", xlabel="GPUs", ylabel="total time (min)")
    for axes in (left, right):
        axes.grid(True, which="both", alpha=0.3)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except OSError as err:
        raise UserError(f"cannot write --plot {path}: {err.strerror}") from None
