"""``megabatch simulate``: predict time, throughput and scaling efficiency of a run.

Starts from a hardware preset (``--preset``, see :mod:`megabatch.simulate.hardware`)
and lets a flag override each of its figures. The model is
:mod:`megabatch.simulate.perfmodel`; its two empirical parameters are fitted on
published records in :mod:`megabatch.simulate.fit` (``--validate`` re-runs the
leave-one-out check); docs/performance-model.md has the equations, the sources and the
validation.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict

from megabatch import flags
from megabatch.errors import UserError
from megabatch.simulate import fit, hardware, perfmodel, report
from megabatch.simulate.bench_file import read_bench
from megabatch.simulate.inputs import Inputs, pack_overhead_ms

FITTED_SOURCE = ("fitted by least squares on the published records "
                 "(megabatch.simulate.fit; --validate)")


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
        help="take the per-GPU images/s, batch and step-time spread from a `megabatch bench` result")
    add("--bench-entry", metavar="NAME", help="train_step entry of --from-bench (the fastest)")
    add("--per-gpu-batch", type=int, metavar="N", help="images per GPU per step")
    add("--model", metavar="NAME|COUNT",
        help=f"{', '.join(hardware.MODELS)}, or a parameter count (default: the --from-bench file's "
             "model, else resnet50)")
    add("--comm-dtype", metavar="DTYPE", help="gradient dtype on the wire: fp32, fp16 or bf16")
    add("--allreduce", metavar="ALGORITHM", help="ring, hierarchical, 2d-torus or tree")
    add("--intra-node-gbps", type=float, metavar="X",
        help="per-GPU ring bandwidth inside a node, Gbit/s")
    add("--inter-node-gbps", type=float, metavar="X",
        help="a node's network bandwidth, all adapters, Gbit/s")
    add("--latency-us", type=float, metavar="X", help="latency of one all-reduce step across nodes, us")
    add("--intra-latency-us", type=float, metavar="X",
        help="latency of one all-reduce step inside a node, us")
    add("--memory-gbs", type=float, metavar="X",
        help="one GPU's memory bandwidth, GB/s (prices the default --overhead-ms)")
    add("--overlap", type=float, metavar="F",
        help="share of backward the all-reduce can hide behind, 0 to 1 (0: after backward)")
    add("--overhead-ms", type=float, metavar="X",
        help="per-step cost of distribution, ms (default: copying gradients to the "
             "communication buffer and back at the device's memory bandwidth)")
    add("--step-cv", type=float, metavar="F",
        help="coefficient of variation of one worker's step time, prices stragglers (default: "
             f"from --from-bench, else fitted on published records, {fit.FITTED.step_cv:g})")
    add("--collective-overhead-us", type=float, metavar="X",
        help="software cost of a step's all-reduce beyond its wire time, never hidden "
             f"(default: fitted on published records, {fit.FITTED.collective_overhead_us:g})")
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
    add("--plot", metavar="FILE.png",
        help="with --sweep-gpus: draw efficiency, time and the parts of the step per GPU count")
    add("--validate", action="store_true",
        help="fit the two empirical parameters leaving out each published record in turn and "
             "print each record beside its prediction")
    add("--json", action="store_true", help="print a JSON object instead of the table")
    add("--sources", action="store_true", help="print every input with its source and exit")


def run(args: argparse.Namespace) -> int:
    """Print the prediction (table or --json), write --plot; 0 on success."""
    if args.validate:
        return _validate_records(args.json)
    inputs, sources = resolve(args)
    if args.sources:
        print(json.dumps(sources, indent=2) if args.json else report.sources_table(inputs, sources))
        return 0
    counts = flags.numbers(args.sweep_gpus, "--sweep-gpus", int, "1,8,64,512,1024", least=1) if args.sweep_gpus else [inputs.gpus]
    for gpus in counts:
        _check_split(gpus, inputs)
    try:
        predictions = [inputs.predict(gpus) for gpus in counts]
    except ValueError as err:
        raise UserError(str(err)) from None
    if args.plot:
        report.plot(predictions, inputs.title, args.plot)
    if args.json:
        objects = [{**p.as_dict(), "inputs": {**asdict(inputs), "gpus": p.gpus}} for p in predictions]
        print(json.dumps({"sweep": objects} if args.sweep_gpus else objects[0], indent=2))
    elif args.sweep_gpus:
        print(report.sweep_table(inputs, predictions))
    else:
        print(report.table(inputs, predictions[0]))
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def _validate_records(as_json: bool) -> int:
    checks = fit.leave_one_out()
    if not as_json:
        print(report.validation_table(checks, fit.FITTED))
        return 0
    rows = [{"record": c.record.name, "title": c.record.title, "source": c.record.source,
             "fitted_without_it": asdict(c.params), "published": c.record.published(),
             "predicted": c.predicted, "error": c.errors,
             "fitted_on": [name for name in c.record.published() if fit.informs_fit(c.record, name)]}
            for c in checks]
    print(json.dumps({"fitted": asdict(fit.FITTED), "leave_one_out": rows,
                      "summary": fit.summary(checks)}, indent=2))
    return 0


def resolve(args: argparse.Namespace) -> tuple[Inputs, dict[str, dict]]:
    """Merge the preset and the flags into :class:`Inputs`; also say where each came from."""
    preset = hardware.PRESETS.get(args.preset)
    if preset is None:
        raise UserError(f"unknown preset {args.preset!r}: choose one of {', '.join(hardware.PRESETS)}")
    values = {name: figure.value for name, figure in preset.figures().items()}
    sources = {name: figure.source for name, figure in preset.figures().items()}
    values["step_cv"], sources["step_cv"] = fit.FITTED.step_cv, FITTED_SOURCE
    values["collective_overhead_us"], sources["collective_overhead_us"] = \
        fit.FITTED.collective_overhead_us, FITTED_SOURCE
    if args.from_bench:
        if args.images_per_sec_per_gpu is not None:
            raise UserError("give --from-bench or --images-per-sec-per-gpu, not both")
        bench = read_bench(args.from_bench, args.bench_entry)
        values["images_per_sec_per_gpu"], sources["images_per_sec_per_gpu"] = \
            bench.images_per_s, bench.source
        if bench.batch is not None and args.per_gpu_batch is None:
            values["per_gpu_batch"], sources["per_gpu_batch"] = bench.batch, args.from_bench
        if bench.step_cv is not None:
            values["step_cv"], sources["step_cv"] = \
                bench.step_cv, f"{bench.source}: spread of its per-repeat times"
    for name in values:
        flag = getattr(args, name, None)
        if flag is not None:
            values[name], sources[name] = flag, f"--{name.replace('_', '-')}"
    model = args.model or "resnet50"
    if args.from_bench and bench.model is not None:
        if args.model is not None and args.model != bench.model:
            raise UserError(f"--from-bench {args.from_bench} timed {bench.model}, not --model {args.model}: "
                            f"leave out --model, or bench {args.model}")
        model = bench.model
    parameters, sources["parameters"] = _parameters(model)
    comm = values["comm_dtype"]
    if comm not in perfmodel.BYTES_PER_ELEMENT:
        raise UserError(f"unknown --comm-dtype {comm!r}: choose fp32, fp16 or bf16")
    overhead = args.overhead_ms
    if overhead is None:
        overhead = pack_overhead_ms(parameters, comm, values["memory_gbs"])
        sources["overhead_ms"] = "gradient copy to and from the buffer at memory_gbs"
    else:
        sources["overhead_ms"] = "--overhead-ms"
    inputs = Inputs(
        title=preset.title, model=model, parameters=parameters, overhead_ms=overhead,
        epochs=args.epochs, dataset_size=args.dataset_size, epoch_boundary=args.epoch_boundary,
        eval_every=args.eval_every, val_size=args.val_size,
        **{name: values[name] for name in values})
    _validate(inputs)
    return inputs, {name: {"value": getattr(inputs, name), "source": source}
                    for name, source in sources.items()}


def _parameters(model: str) -> tuple[int, str]:
    if model in hardware.MODELS:
        return hardware.MODELS[model], (f"{model} as torchvision builds it" if model.startswith("resnet")
                                        else f"{model} as megabatch builds it (megabatch.models)")
    try:
        count = float(model)
    except ValueError:
        count = None
    if count is None or not 1 <= count < math.inf or count != int(count):
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
        if not 0 < getattr(inputs, name) < math.inf:
            raise UserError(f"{flag(name)} positive and finite, not {getattr(inputs, name)}")
    for name in ["intra_latency_us", "latency_us", "overhead_ms", "eval_every", "step_cv",
                 "collective_overhead_us"]:
        if not 0 <= getattr(inputs, name) < math.inf:
            raise UserError(f"{flag(name)} zero or more and finite, not {getattr(inputs, name)}")
    if not 0 <= inputs.overlap <= 1:
        raise UserError(f"--overlap is a share of the backward pass, 0 to 1, not {inputs.overlap}")
    loader = inputs.input_images_per_sec_per_node
    if loader is not None and not 0 < loader < math.inf:
        raise UserError(f"{flag('input_images_per_sec_per_node')} positive and finite, not {loader}")
    if inputs.allreduce not in perfmodel.ALGORITHMS:
        raise UserError(f"unknown --allreduce {inputs.allreduce!r}: "
                        "choose ring, hierarchical, 2d-torus or tree")
    if inputs.epoch_boundary not in perfmodel.EPOCH_BOUNDARIES:
        raise UserError(f"unknown --epoch-boundary {inputs.epoch_boundary!r}: "
                        "choose wrap, partial or drop")


def _check_split(gpus: int, inputs: Inputs) -> None:
    per_node = inputs.gpus_per_node
    if inputs.allreduce != "ring" and gpus > per_node and gpus % per_node:
        raise UserError(f"{inputs.allreduce} all-reduce needs whole nodes: {gpus} GPUs is not a "
                        f"multiple of --gpus-per-node {per_node}; change either, or use ring")
