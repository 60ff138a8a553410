"""Published ResNet-50/ImageNet training records the performance model is checked against.

Each record names the hardware preset of its cluster, the figures of its own run that
differ from the preset (each with its source), and what was published: the total time,
a scaling efficiency, or both. :mod:`~megabatch.simulate.fit` fits the model's two
empirical parameters on these records and predicts each one from a fit that leaves it
out. No figure here was chosen by comparing a prediction with a record.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from megabatch.simulate import hardware, perfmodel
from megabatch.simulate.hardware import Figure
from megabatch.simulate.inputs import Inputs, pack_overhead_ms

MLPERF_V30 = "MLPerf Training v3.0 results (github.com/mlcommons/training_results_v3.0)"
MLPERF_V40 = "MLPerf Training v4.0 results (github.com/mlcommons/training_results_v4.0)"
MLPERF_SCORE = "the mean of the middle three of five runs (MLPerf's score)"


@dataclass(frozen=True)
class NodeFigure:
    """A published measurement of one full node running the record's software: the
    device figure is inferred from it with the model's own equations, so that the
    node's all-reduce and its straggling are not counted twice."""

    images_per_sec_per_gpu: float
    per_gpu_batch: int
    source: str


# NVIDIA's v3.0 single-node result: median epoch after the first, 22.85 s for 1,281,167
# images on 8 GPUs at 400 images each (the same in all five logs to 0.1%).
MLPERF_NODE = NodeFigure(
    1_281_167 / 22.85 / 8, 400,
    f"{MLPERF_V30}, NVIDIA/results/dgxh100_ngc23.04_mxnet: median epoch 22.85 s on one DGX H100, "
    "400 images per GPU")
MLPERF = {
    "comm_dtype": Figure("fp16", "MXNet trains the network in fp16; Horovod all-reduces its "
                                 "fp16 gradients (not confirmed from the logs)"),
    "overlap": Figure(0.0, "the submissions' configs: 'Default is no NCCL and BWD overlap'"),
    "allreduce": Figure("tree", "SHARP network (SBATCH_NETWORK=sharp): NCCL's tree or CollNet "
                                "over SHARP, both reduction trees"),
}


@dataclass(frozen=True)
class Record:
    """One published run and how the model sees it."""

    name: str
    title: str
    source: str
    preset: str
    epochs: float
    changes: dict[str, Figure] = field(default_factory=dict)
    """The run's own figures where they differ from the preset's."""
    node: NodeFigure | None = None
    """Where given, the device figure comes from this one-node measurement."""
    epoch_boundary: str = "wrap"
    eval_every: float = 0.0
    time_s: float | None = None
    efficiency_vs_1gpu: float | None = None
    efficiency_vs_1node: float | None = None

    def published(self) -> dict[str, float]:
        """What the record published, by the name of the quantity the model predicts."""
        values = {"total_time_s": self.time_s, "efficiency_vs_1gpu": self.efficiency_vs_1gpu,
                  "efficiency_vs_1node": self.efficiency_vs_1node}
        return {name: value for name, value in values.items() if value is not None}

    def inputs(self, step_cv: float, collective_overhead_us: float) -> Inputs:
        """The model's inputs for this run, with the two empirical parameters given."""
        preset = hardware.PRESETS[self.preset]
        values = {name: figure.value for name, figure in preset.figures().items()}
        values.update({name: figure.value for name, figure in self.changes.items()})
        parameters = hardware.MODELS["resnet50"]
        inputs = Inputs(
            title=self.title, model="resnet50", parameters=parameters,
            overhead_ms=pack_overhead_ms(parameters, values["comm_dtype"], values["memory_gbs"]),
            epochs=self.epochs, dataset_size=hardware.IMAGENET_TRAIN,
            epoch_boundary=self.epoch_boundary, eval_every=self.eval_every,
            val_size=hardware.IMAGENET_VAL, step_cv=step_cv,
            collective_overhead_us=collective_overhead_us, **values)
        if self.node is None:
            return inputs
        return replace(inputs, images_per_sec_per_gpu=device_from_node(inputs, self.node))


def device_from_node(inputs: Inputs, node: NodeFigure) -> float:
    """The images/s of one device alone for which the model gives one full node of
    ``inputs`` the measured ``node`` throughput. The node's step is piecewise linear
    in the compute time, so the secant method lands on it in a few steps."""
    measured = node.per_gpu_batch / node.images_per_sec_per_gpu

    def excess(compute: float) -> float:
        trial = replace(inputs, images_per_sec_per_gpu=node.per_gpu_batch / compute,
                        per_gpu_batch=node.per_gpu_batch)
        return perfmodel.step_time(trial.workload(), trial.network(), inputs.gpus_per_node,
                                   "ring").total_s - measured

    low, high = measured / 2, measured
    f_low, f_high = excess(low), excess(high)
    for _ in range(30):
        if abs(f_high) < 1e-12 * measured or f_high == f_low:
            break
        low, high = high, high - f_high * (high - low) / (f_high - f_low)
        f_low, f_high = f_high, excess(high)
    if not high > 0:
        raise ValueError(f"{node.source}: the model's distribution costs alone exceed the "
                         "measured step of one node")
    return node.per_gpu_batch / high


def _mlperf(name: str, title: str, source: str, gpus: int, batch: int, epochs: float,
            time_s: float, config: str) -> Record:
    return Record(
        name, title, source, "dgx-h100", epochs, eval_every=4, time_s=time_s, node=MLPERF_NODE,
        changes={"gpus": Figure(gpus, f"{gpus // 8} nodes x 8 H100 SXM5 (the submission)"),
                 "per_gpu_batch": Figure(batch, f"{config}: BATCHSIZE={batch}"),
                 **(MLPERF if gpus > 8 else {k: v for k, v in MLPERF.items() if k != "allreduce"})})


RECORDS: tuple[Record, ...] = (
    Record(
        "akiba2017", "Akiba et al. 2017: 1,024 P100, 32k batch, 90 epochs",
        "arXiv:1711.04325: 897.9 s; 70% scaling efficiency against 1 GPU, 80% against 1 node",
        "mn1", 90, time_s=897.9, efficiency_vs_1gpu=0.70, efficiency_vs_1node=0.80),
    Record(
        "chainermn2017", "ChainerMN 2017: 128 GPUs, parallel efficiency",
        "Akiba, Fukuda, Suzuki 2017 (arXiv:1710.11351), abstract: ResNet-50 on ImageNet 'up "
        "to 128 GPUs with the parallel efficiency of 90%'",
        "mn1", 90, efficiency_vs_1gpu=0.90,
        changes={"gpus": Figure(128, "arXiv:1710.11351: 128 GPUs. Their cluster is not "
                                     "confirmed here; the record runs on the MN-1 preset")}),
    Record(
        "goyal2017", "Goyal et al. 2017: 256 P100, 8k batch, 90 epochs",
        "arXiv:1706.02677, abstract: 'a minibatch size of 8192 on 256 GPUs in one hour' "
        "(rounded by the authors)",
        "bigbasin-p100", 90, time_s=3600.0,
        node=NodeFigure(1_281_167 * 90 / (29 * 3600) / 8, 32,
                        "arXiv:1706.02677: 29 hours for 90 epochs on one server of 8 P100, "
                        "32 images per GPU (rounded by the authors)")),
    Record(
        "mikami2018", "Mikami et al. 2018: 2,176 V100 (ABCI), 68k batch, 2D-torus",
        "arXiv:1811.05233v1: 224 s on 2,176 V100, batch size controlled from 34K to 68K",
        "abci-v100", 90, time_s=224.0,
        changes={
            "gpus": Figure(2176, "arXiv:1811.05233v1: 2,176 Tesla V100 of ABCI"),
            "per_gpu_batch": Figure(32, "68K / 2,176; the batch grows from 34K (16 per GPU) "
                                        "during training, at an epoch not confirmed here"),
            "allreduce": Figure("2d-torus", "arXiv:1811.05233: 2D-Torus all-reduce"),
            "overlap": Figure(1.0, "NNL's all_reduce_callback all-reduces packs of 2 Mi "
                                   "parameters during backward (nnabla-examples)"),
        }),
    Record(
        "yamazaki2019", "Yamazaki et al. 2019: 2,048 V100 (ABCI), 81,920 batch",
        "arXiv:1903.12650, abstract: 74.7 s on 2,048 GPUs of ABCI, over 1.73 million images/s; "
        "90 epochs assumed (not confirmed here: 90 epochs at 1.73M images/s take 66.6 s)",
        "abci-v100", 90, time_s=74.7),
    _mlperf("mlperf3.0-512", "MLPerf v3.0: 512 H100 (64 DGX), 20,480 batch, 50 epochs",
            f"{MLPERF_V30}, NVIDIA/results/dgxh100_n64_ngc23.04_mxnet: 30.556 s, {MLPERF_SCORE}",
            512, 40, 50, 30.556, "config_DGXH100_multi_64x8x40.sh"),
    _mlperf("mlperf3.0-768", "MLPerf v3.0: 768 H100 (96 DGX), 32,256 batch, 56 epochs",
            f"{MLPERF_V30}, NVIDIA/results/dgxh100_n96_ngc23.04_mxnet: 22.158 s, {MLPERF_SCORE}",
            768, 42, 56, 22.158, "config_DGXH100_multi_96x8x42.sh"),
    _mlperf("mlperf3.0-3584", "MLPerf v3.0: 3,584 H100 (448 HGX), 57,344 batch, 77 epochs",
            f"{MLPERF_V30}, NVIDIA_CoreWeave/results/coreweave_hgxh100_n448_ngc23.04_mxnet: "
            f"10.979 s (0.183 min on NVIDIA's page), {MLPERF_SCORE}",
            3584, 16, 77, 10.979, "config_DGXH100_multi_448x8x16.sh"),
    _mlperf("mlperf4.0-8", "MLPerf v4.0: 8 H100 (1 DGX), 3,200 batch, 35 epochs",
            f"{MLPERF_V40}, NVIDIA/results/eos_ngc24.04_mxnet: 796.2 s (13.3 min), {MLPERF_SCORE}",
            8, 400, 35, 796.218, "config_DGXH100.sh"),
    _mlperf("mlperf4.0-64", "MLPerf v4.0: 64 H100 (8 DGX), 3,200 batch, 35 epochs",
            f"{MLPERF_V40}, NVIDIA/results/eos_n8_ngc24.04_mxnet: 150.333 s, {MLPERF_SCORE}",
            64, 50, 35, 150.333, "config_DGXH100_multi_8x8x50.sh"),
    _mlperf("mlperf4.0-2528", "MLPerf v4.0: 2,528 H100 (316 DGX), 40,448 batch, 68.7 epochs",
            f"{MLPERF_V40}, NVIDIA/results/eos_n316_ngc24.04_mxnet: 13.676 s, {MLPERF_SCORE} "
            "(66, 70 and 70 epochs: the model runs their mean)",
            2528, 16, 68.67, 13.676, "config_DGXH100_multi_316x8x16.sh"),
)
