"""Performance model of synchronous data-parallel training: pure functions, no torch.

One training step of ``p`` workers takes

    step = max(compute + exposed all-reduce + overhead + straggler,  input time)
    compute   = b / r                  (b images per worker, r images/s of one device alone)
    exposed   = max(0, T_allreduce + o - overlap * backward),   backward = 2/3 * compute
    overhead  = per-step cost of distribution (packing/casting gradients), 0 when p = 1
    straggler = cv * compute * E[max of p standard normals]   (the wait for the slowest worker)
    input     = images a node needs per step / images/s its input pipeline delivers

``o`` is the software cost of one all-reduce call and ``cv`` the coefficient of variation
of one worker's compute time per step: the model's two empirical parameters, fitted on
published records in :mod:`~megabatch.simulate.fit`.

and the all-reduce of ``n`` gradient bytes costs, with bandwidth ``B`` (bytes/s one
way) and latency ``a`` (s) per step:

    ring(n, p)         = 2 (p-1)/p * n/B + 2 (p-1) a
    reduce_scatter     =   (p-1)/p * n/B +   (p-1) a      (all-gather: the same)
    chain (reduce or broadcast, pipelined) = n/B + (p-1) a

Across ``N`` nodes of ``g`` GPUs (docs/performance-model.md derives each one):

    ring          one ring through all p GPUs: B = min(B_intra, B_node); its 2 (p-1)
                  steps cross a node boundary in a share N/p of the hops
    hierarchical  chain-reduce to one GPU per node, ring over the N node leaders
                  (with the node's whole bandwidth), chain-broadcast back
    2d-torus      reduce-scatter inside the node, g concurrent rings across the N
                  nodes on n/g bytes each (sharing the node's bandwidth), all-gather
    tree          NCCL's tree: one pipeline, a chain through the node's GPUs into a
                  binary tree over the N nodes, up and down: B = min(B_intra, B_node),
                  latency (g-1) a_intra + floor(log2 N) a_inter each way (SHARP reduces
                  in the switches, shallower still)

On one node every algorithm is the intra-node ring. Efficiencies compare
throughputs computed with these same equations at 1 GPU and at 1 node.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "bf16": 2}
ALGORITHMS = ("ring", "hierarchical", "2d-torus", "tree")
EPOCH_BOUNDARIES = ("wrap", "partial", "drop")

# Backward costs about twice the forward (two matrix products per layer instead of
# one), so it is 2/3 of a training step; the all-reduce can only hide behind it.
BACKWARD_FRACTION = 2.0 / 3.0
# Evaluation runs the forward pass only: about a third of a training step's work.
EVAL_SPEEDUP = 3.0


def ring_allreduce(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Seconds for a ring all-reduce of ``nbytes`` over ``ranks``: reduce-scatter
    then all-gather, each ``ranks - 1`` steps moving ``nbytes / ranks`` per link."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / bandwidth + 2 * (ranks - 1) * latency


def reduce_scatter(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Seconds for a ring reduce-scatter (an all-gather costs the same)."""
    if ranks <= 1:
        return 0.0
    return (ranks - 1) / ranks * nbytes / bandwidth + (ranks - 1) * latency


def chain(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Seconds for a pipelined reduce (or broadcast) along a chain of ``ranks``:
    the whole buffer crosses one link, and the pipeline fills in ``ranks - 1`` hops."""
    if ranks <= 1:
        return 0.0
    return nbytes / bandwidth + (ranks - 1) * latency


def tree_depth(ranks: int) -> int:
    """Hops from the root to the deepest leaf of a complete binary tree of ``ranks``."""
    return ranks.bit_length() - 1


@lru_cache(maxsize=None)
def expected_max_normal(n: int) -> float:
    """E[max of ``n`` independent standard normals]: the integral of x n phi(x) Phi(x)^(n-1)
    by Simpson's rule on [-9, 9] (the density is nil beyond for n <= 10^8). 0 for n = 1;
    1/sqrt(pi) for n = 2; below sqrt(2 ln n), the usual bound, for every n > 1."""
    if n < 1:
        raise ValueError(f"the expected maximum needs at least one draw, not {n}")
    if n == 1:
        return 0.0
    steps, low, high = 3600, -9.0, 9.0
    h = (high - low) / steps
    total = 0.0
    for i in range(steps + 1):
        x = low + i * h
        cdf = 0.5 * math.erfc(-x / math.sqrt(2))
        density = n * math.exp(-x * x / 2) / math.sqrt(2 * math.pi) * cdf ** (n - 1)
        total += (1 if i in (0, steps) else 4 if i % 2 else 2) * x * density
    return total * h / 3


@dataclass(frozen=True)
class Network:
    """The links a gradient all-reduce runs over. Bandwidths are bytes/s in one
    direction, latencies seconds per ring step."""

    gpus_per_node: int
    intra_node_bw: float
    """What one GPU can send to its ring neighbour inside a node (NCCL's bus bandwidth)."""
    inter_node_bw: float
    """What one node can send to other nodes, all its network adapters together."""
    intra_latency: float
    inter_latency: float

    def nodes(self, gpus: int) -> int:
        return math.ceil(gpus / self.gpus_per_node)


def allreduce_time(nbytes: float, gpus: int, net: Network, algorithm: str) -> float:
    """Seconds to all-reduce ``nbytes`` over ``gpus`` GPUs with ``algorithm``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown all-reduce {algorithm!r}; choose one of {ALGORITHMS}")
    per_node = min(gpus, net.gpus_per_node)
    nodes = net.nodes(gpus)
    if nodes == 1:
        return ring_allreduce(nbytes, gpus, net.intra_node_bw, net.intra_latency)
    if algorithm == "ring":
        if per_node == 1:
            return ring_allreduce(nbytes, gpus, net.inter_node_bw, net.inter_latency)
        # Chunks go round the ring pipelined, so the slowest link sets the bandwidth
        # and the latencies of the hops a chunk crosses add up: N of every p hops
        # leave a node.
        share = nodes / gpus
        latency = (1 - share) * net.intra_latency + share * net.inter_latency
        return ring_allreduce(nbytes, gpus, min(net.intra_node_bw, net.inter_node_bw), latency)
    if gpus % per_node:
        raise ValueError(f"{algorithm} needs whole nodes: {gpus} GPUs is not a multiple of {per_node}")
    if algorithm == "hierarchical":
        intra = chain(nbytes, per_node, net.intra_node_bw, net.intra_latency)
        return 2 * intra + ring_allreduce(nbytes, nodes, net.inter_node_bw, net.inter_latency)
    if algorithm == "tree":
        # NCCL's tree is one pipeline, up and down: a chain through the node's GPUs into a
        # binary tree over the nodes (its two trees share the load, so each direction moves
        # the buffer once), so the slowest link sets the bandwidth, and a chunk's latency
        # is the chain's hops and the tree's depth.
        bandwidth = min(net.intra_node_bw, net.inter_node_bw)
        hops = (per_node - 1) * net.intra_latency + tree_depth(nodes) * net.inter_latency
        return 2 * (nbytes / bandwidth + hops)
    # 2d-torus: the node's g vertical rings run at once and share its bandwidth.
    intra = reduce_scatter(nbytes, per_node, net.intra_node_bw, net.intra_latency)
    vertical = ring_allreduce(nbytes / per_node, nodes, net.inter_node_bw / per_node,
                              net.inter_latency)
    return 2 * intra + vertical


def pack_overhead(parameters: int, comm_dtype: str, memory_bw: float) -> float:
    """Seconds to copy fp32 gradients into a ``comm_dtype`` buffer and back, at the
    device's memory bandwidth (bytes/s): read 4 + write c bytes, then read c + write 4."""
    return parameters * 2 * (4 + BYTES_PER_ELEMENT[comm_dtype]) / memory_bw


@dataclass(frozen=True)
class Workload:
    """What each worker does in one step."""

    per_gpu_batch: int
    images_per_s: float
    """Training throughput of one device alone at ``per_gpu_batch`` (measured or published)."""
    grad_bytes: float
    overlap: float = 0.0
    """Share of the backward pass the all-reduce can run behind (0: after backward)."""
    overhead_s: float = 0.0
    """Per-step cost of distribution, paid only when there is more than one GPU."""
    input_images_per_s_per_node: float | None = None
    """What a node's input pipeline delivers; None: never the limit."""
    step_cv: float = 0.0
    """Coefficient of variation of one worker's compute time per step (stragglers)."""
    collective_overhead_s: float = 0.0
    """Software cost of one all-reduce call (launch, negotiation), beside the wire time."""


@dataclass(frozen=True)
class StepTime:
    """Where the time of one step goes, in seconds."""

    compute_s: float
    allreduce_s: float
    """Wire time plus the software cost of the call; what backward does not hide is exposed."""
    allreduce_exposed_s: float
    overhead_s: float
    straggler_s: float
    """Expected wait for the slowest worker beyond the mean compute time."""
    input_wait_s: float

    @property
    def total_s(self) -> float:
        return (self.compute_s + self.allreduce_exposed_s + self.overhead_s + self.straggler_s
                + self.input_wait_s)


def step_time(work: Workload, net: Network, gpus: int, algorithm: str,
              images_per_gpu: float | None = None) -> StepTime:
    """One step of ``gpus`` workers, each with ``images_per_gpu`` images (default: the batch)."""
    images = work.per_gpu_batch if images_per_gpu is None else images_per_gpu
    compute = images / work.images_per_s
    allreduce = allreduce_time(work.grad_bytes, gpus, net, algorithm)
    exposed = max(0.0, allreduce - work.overlap * BACKWARD_FRACTION * compute)
    if gpus > 1:
        # The step's last collective starts when backward ends: its software cost is
        # never hidden, whatever the overlap.
        allreduce += work.collective_overhead_s
        exposed += work.collective_overhead_s
    overhead = work.overhead_s if gpus > 1 else 0.0
    # Synchronous SGD starts the next step when the slowest of the workers is done.
    straggler = work.step_cv * compute * expected_max_normal(gpus)
    busy = compute + exposed + overhead + straggler
    input_wait = 0.0
    if work.input_images_per_s_per_node is not None:
        # The loader prefetches while the GPUs work, so it only costs what it lags.
        produce = min(gpus, net.gpus_per_node) * images / work.input_images_per_s_per_node
        input_wait = max(0.0, produce - busy)
    return StepTime(compute, allreduce, exposed, overhead, straggler, input_wait)


def throughput(work: Workload, net: Network, gpus: int, algorithm: str) -> float:
    """Steady-state images/s of ``gpus`` workers."""
    return gpus * work.per_gpu_batch / step_time(work, net, gpus, algorithm).total_s


@dataclass(frozen=True)
class Schedule:
    """How much training (and evaluation) a run does."""

    epochs: float
    dataset_size: int
    epoch_boundary: str = "wrap"
    """wrap: the loader runs on into the next epoch, steps = ceil(E * D / B) (Chainer);
    partial: each epoch ends with one smaller step (PyTorch, drop_last=False);
    drop: the last incomplete batch of each epoch is skipped (drop_last=True).
    partial and drop count whole epochs (a fractional ``epochs`` rounds up)."""
    eval_every: float = 0.0
    """Evaluate every this many epochs; 0: evaluation is not part of the time."""
    val_size: int = 50_000


@dataclass(frozen=True)
class Prediction:
    """What :func:`predict` says of one run; :meth:`as_dict` is the ``--json`` object."""

    gpus: int
    nodes: int
    algorithm: str
    step: StepTime
    steps: int
    train: StepTime
    """The parts of ``step`` summed over every training step of the run."""
    eval_time_s: float
    images_per_s: float
    efficiency_vs_1gpu: float
    efficiency_vs_1node: float | None
    """None below one full node, where it would compare with more GPUs than it has."""
    epochs: float

    @property
    def total_time_s(self) -> float:
        return self.train.total_s + self.eval_time_s

    @property
    def epoch_time_s(self) -> float:
        return self.total_time_s / self.epochs

    def as_dict(self) -> dict:
        step = asdict(self.step)
        return {
            "gpus": self.gpus,
            "nodes": self.nodes,
            "allreduce": self.algorithm,
            "steps": self.steps,
            "step_time_s": self.step.total_s,
            "epoch_time_s": self.epoch_time_s,
            "total_time_s": self.total_time_s,
            "images_per_s": self.images_per_s,
            "scaling_efficiency_vs_1gpu": self.efficiency_vs_1gpu,
            "scaling_efficiency_vs_1node": self.efficiency_vs_1node,
            "breakdown": {
                "per_step": step,
                "total": {**asdict(self.train), "evaluation_s": self.eval_time_s},
            },
        }


def epochs_run(schedule: Schedule) -> float:
    """The epochs a run trains: ``epochs`` when the loader wraps, whole epochs otherwise."""
    return schedule.epochs if schedule.epoch_boundary == "wrap" else math.ceil(schedule.epochs)


def train_steps(gpus: int, work: Workload, schedule: Schedule) -> list[tuple[int, float]]:
    """(count, images per GPU) pairs making up the run's training steps."""
    global_batch = gpus * work.per_gpu_batch
    full, rest = divmod(schedule.dataset_size, global_batch)
    if schedule.epoch_boundary == "wrap":
        # 1e-9 keeps an exact whole number of steps from rounding up through float error.
        return [(math.ceil(schedule.epochs * schedule.dataset_size / global_batch - 1e-9),
                 work.per_gpu_batch)]
    epochs = epochs_run(schedule)
    steps = [(full * epochs, work.per_gpu_batch)]
    if schedule.epoch_boundary == "partial" and rest:
        steps.append((epochs, math.ceil(rest / gpus)))
    return steps


def predict(work: Workload, net: Network, gpus: int, algorithm: str,
            schedule: Schedule) -> Prediction:
    """Time, throughput and scaling efficiency of ``schedule`` on ``gpus`` GPUs."""
    if schedule.epoch_boundary not in EPOCH_BOUNDARIES:
        raise ValueError(f"unknown epoch boundary {schedule.epoch_boundary!r}")
    step = step_time(work, net, gpus, algorithm)
    groups = [(count, step_time(work, net, gpus, algorithm, images))
              for count, images in train_steps(gpus, work, schedule)]
    steps = sum(count for count, _ in groups)
    if steps == 0 and schedule.epoch_boundary == "wrap":
        raise ValueError(f"the run has no training step: {schedule.epochs:g} epochs of "
                         f"{schedule.dataset_size:,} images are less than one step; give more epochs")
    if steps == 0:
        raise ValueError(f"the run has no training step: the global batch of {gpus * work.per_gpu_batch:,} "
                         f"exceeds the dataset of {schedule.dataset_size:,} and drop skips it; use fewer "
                         "GPUs, a smaller batch or --epoch-boundary wrap")
    train = StepTime(*(sum(count * getattr(part, name) for count, part in groups)
                       for name in StepTime.__dataclass_fields__))
    evaluation = 0.0
    if schedule.eval_every > 0:
        passes = math.floor(epochs_run(schedule) / schedule.eval_every + 1e-9)
        if passes > steps:
            raise ValueError(f"evaluating every {schedule.eval_every:g} epochs is more often than every "
                             f"training step ({steps:,}); give a larger --eval-every, or 0 for none")
        per_gpu = math.ceil(schedule.val_size / gpus)
        evaluation = passes * per_gpu / (EVAL_SPEEDUP * work.images_per_s)
    node = net.gpus_per_node
    # Every algorithm is the intra-node ring on 1 GPU or 1 node, so the baselines
    # are the same whatever the algorithm of the large run.
    images_per_s = gpus * work.per_gpu_batch / step.total_s
    one_gpu = throughput(work, net, 1, "ring")
    one_node = throughput(work, net, node, "ring")
    return Prediction(
        gpus=gpus, nodes=net.nodes(gpus), algorithm=algorithm, step=step, steps=steps,
        train=train, eval_time_s=evaluation, images_per_s=images_per_s,
        efficiency_vs_1gpu=images_per_s / (gpus * one_gpu),
        efficiency_vs_1node=images_per_s / (gpus / node * one_node) if gpus >= node else None,
        epochs=epochs_run(schedule),
    )
