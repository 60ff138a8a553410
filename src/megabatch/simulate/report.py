"""What ``megabatch simulate`` prints and draws: tables, the validation table, the plot.

matplotlib is imported only inside :func:`plot`.
"""

from __future__ import annotations

from megabatch.errors import UserError
from megabatch.simulate import fit, perfmodel
from megabatch.simulate.inputs import Inputs


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f} ms"


def _duration(seconds: float) -> str:
    return f"{seconds:,.1f} s ({seconds / 60:,.1f} min)" if seconds < 86400 else \
        f"{seconds:,.0f} s ({seconds / 3600:,.1f} h)"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.1%}"


def _short(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else \
        f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def header(inputs: Inputs) -> list[str]:
    return [
        inputs.title,
        f"  per-GPU batch       {inputs.per_gpu_batch} images, "
        f"{inputs.images_per_sec_per_gpu:,.1f} images/s on one GPU alone",
        f"  gradients           {inputs.model}: {inputs.parameters:,} parameters x "
        f"{inputs.comm_dtype} = {inputs.grad_bytes / 1e6:.1f} MB",
        f"  all-reduce          {inputs.allreduce}, {inputs.overlap:.0%} of backward can hide it, "
        f"{inputs.collective_overhead_us:g} us of software per step",
        f"  links               in a node {inputs.intra_node_gbps / 8:.1f} GB/s per GPU and "
        f"{inputs.intra_latency_us:g} us/step, across nodes {inputs.inter_node_gbps / 8:.1f} GB/s "
        f"per node and {inputs.latency_us:g} us/step",
        f"  stragglers          one worker's step time varies by {inputs.step_cv:.1%} (CV)",
        f"  run                 {inputs.epochs:g} epochs of {inputs.dataset_size:,} images "
        f"({inputs.epoch_boundary} at epoch ends"
        + (f", evaluation every {inputs.eval_every:g} epochs)" if inputs.eval_every else ")"),
    ]


def _layout(gpus: int, nodes: int, per_node: int) -> str:
    """How ``gpus`` sit on their nodes: 16 = 2 node(s) x 8; 12 on 2 node(s) (8 + 4)."""
    if gpus <= per_node or gpus % per_node == 0:
        return f"{gpus} = {nodes} node(s) x {min(gpus, per_node)}"
    return f"{gpus} on {nodes} node(s) ({per_node} x {nodes - 1} + {gpus % per_node})"


def table(inputs: Inputs, pred: perfmodel.Prediction) -> str:
    step = pred.step
    lines = header(inputs) + [
        f"  GPUs                {_layout(pred.gpus, pred.nodes, inputs.gpus_per_node)}, global batch "
        f"{pred.gpus * inputs.per_gpu_batch:,}, {pred.steps:,} steps",
        "",
        f"  step           {_ms(step.total_s)}",
        f"    compute      {_ms(step.compute_s)}",
        f"    all-reduce   {_ms(step.allreduce_exposed_s)}   not hidden behind backward, "
        f"of {step.allreduce_s * 1e3:.1f} ms",
        f"    overhead     {_ms(step.overhead_s)}",
        f"    stragglers   {_ms(step.straggler_s)}   waiting for the slowest of {pred.gpus}",
        f"    input wait   {_ms(step.input_wait_s)}",
        f"  epoch          {_duration(pred.epoch_time_s)}",
        f"  total          {_duration(pred.total_time_s)}"
        + (f", of which evaluation {pred.eval_time_s:,.1f} s" if pred.eval_time_s else ""),
        f"  throughput     {pred.images_per_s:,.0f} images/s",
        f"  scaling efficiency  {pred.efficiency_vs_1gpu:.1%} vs 1 GPU, "
        f"{_percent(pred.efficiency_vs_1node)} vs 1 node of {inputs.gpus_per_node}",
    ]
    return "\n".join(lines)


def sweep_table(inputs: Inputs, predictions: list[perfmodel.Prediction]) -> str:
    lines = header(inputs) + ["", "   GPUs  nodes    step ms  all-reduce ms  not hidden ms"
                              "  straggler ms     images/s  eff 1 GPU  eff node      total"]
    for p in predictions:
        lines.append(f"  {p.gpus:5d}  {p.nodes:5d}  {p.step.total_s * 1e3:9.1f}  "
                     f"{p.step.allreduce_s * 1e3:13.1f}  {p.step.allreduce_exposed_s * 1e3:13.1f}  "
                     f"{p.step.straggler_s * 1e3:12.1f}  {p.images_per_s:11,.0f}  "
                     f"{p.efficiency_vs_1gpu:9.1%}  {_percent(p.efficiency_vs_1node):>8}  "
                     f"{_short(p.total_time_s):>9}")
    return "\n".join(lines)


def sources_table(inputs: Inputs, sources: dict[str, dict]) -> str:
    lines = [inputs.title]
    for name, entry in sources.items():
        value = entry["value"]
        value = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"  {name:30} {value:>10}  {entry['source']}")
    return "\n".join(lines)


def _quantity(name: str, value: float) -> str:
    return _short(value) if name == "total_time_s" else f"{value:.1%}"


def _error(name: str, value: float) -> str:
    return f"{value:+.1%}" if name == "total_time_s" else f"{100 * value:+.1f} pt"


def validation_table(checks: list[fit.Check], fitted: fit.Parameters) -> str:
    """Each record beside its prediction from the fit that leaves it out."""
    lines = [f"fit on every record: step CV {fitted.step_cv:.4f}, collective overhead "
             f"{fitted.collective_overhead_us:,.0f} us (the defaults)",
             "each record below is predicted from a fit that leaves it out",
             "", f"  {'record':16} {'quantity':20} {'published':>10} {'predicted':>10} "
                 f"{'error':>9}  {'step CV':>7} {'overhead us':>11}"]
    names = {"total_time_s": "time", "efficiency_vs_1gpu": "efficiency vs 1 GPU",
             "efficiency_vs_1node": "efficiency vs node"}
    for check in checks:
        for name, published in check.record.published().items():
            note = "" if fit.informs_fit(check.record, name) else "  (not fitted on)"
            lines.append(f"  {check.record.name:16} {names[name]:20} "
                         f"{_quantity(name, published):>10} "
                         f"{_quantity(name, check.predicted[name]):>10} "
                         f"{_error(name, check.errors[name]):>9}  {check.params.step_cv:7.4f} "
                         f"{check.params.collective_overhead_us:11,.0f}{note}")
    s = fit.summary(checks)
    lines += ["", f"  total time over {s['time_records']} records: median absolute error "
                  f"{s['median_abs_time_error']:.1%}, worst {s['max_abs_time_error']:.1%}"]
    return "\n".join(lines)


def plot(predictions: list[perfmodel.Prediction], title: str, path: str) -> None:
    """Efficiency, total time, and where the step goes, against the GPU count."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from None
    gpus = [p.gpus for p in predictions]
    figure = Figure(figsize=(14, 4))
    left, middle, right = figure.subplots(1, 3)
    left.plot(gpus, [100 * p.efficiency_vs_1gpu for p in predictions], "o-", label="vs 1 GPU")
    nodes = [p for p in predictions if p.efficiency_vs_1node is not None]
    left.plot([p.gpus for p in nodes], [100 * p.efficiency_vs_1node for p in nodes], "s--",
              label="vs 1 node")
    left.set(xscale="log", ylim=(0, 105), xlabel="GPUs", ylabel="scaling efficiency (%)")
    left.legend()
    middle.plot(gpus, [p.total_time_s / 60 for p in predictions], "o-")
    middle.set(xscale="log", yscale="log", xlabel="GPUs", ylabel="total time (min)")
    shares = {"compute": [p.step.compute_s for p in predictions],
              "all-reduce (not hidden)": [p.step.allreduce_exposed_s for p in predictions],
              "stragglers": [p.step.straggler_s for p in predictions],
              "overhead + input wait": [p.step.overhead_s + p.step.input_wait_s
                                        for p in predictions]}
    totals = [p.step.total_s for p in predictions]
    right.stackplot(gpus, *[[100 * part / total for part, total in zip(parts, totals)]
                            for parts in shares.values()], labels=list(shares))
    right.set(xscale="log", ylim=(0, 100), xlabel="GPUs", ylabel="share of the step (%)")
    right.legend(loc="lower left", fontsize=8)
    for axes in (left, middle, right):
        axes.grid(True, which="both", alpha=0.3)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except OSError as err:
        raise UserError(f"cannot write --plot {path}: {err.strerror}") from None
