"""Every figure the performance model needs, in the units people quote them in.

:class:`Inputs` is what ``megabatch simulate`` resolves from a preset and its flags, and
what each published record in :mod:`~megabatch.simulate.records` resolves from its
preset and its own figures: one place turns Gbit/s, microseconds and GB/s into the
:mod:`~megabatch.simulate.perfmodel` types.
"""

from __future__ import annotations

from dataclasses import dataclass

from megabatch.simulate import perfmodel


@dataclass(frozen=True)
class Inputs:
    """A cluster, a workload and a run, after every source has been merged."""

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
    step_cv: float
    """Coefficient of variation of one worker's compute time per step."""
    collective_overhead_us: float
    """Software cost of a step's gradient all-reduce beyond its wire time."""

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
            input_images_per_s_per_node=self.input_images_per_sec_per_node,
            step_cv=self.step_cv, collective_overhead_s=self.collective_overhead_us / 1e6)

    def schedule(self) -> perfmodel.Schedule:
        return perfmodel.Schedule(self.epochs, self.dataset_size, self.epoch_boundary,
                                  self.eval_every, self.val_size)

    def predict(self, gpus: int | None = None) -> perfmodel.Prediction:
        """The model's prediction for ``gpus`` GPUs (default: :attr:`gpus`)."""
        return perfmodel.predict(self.workload(), self.network(), self.gpus if gpus is None else gpus,
                                 self.allreduce, self.schedule())


def pack_overhead_ms(parameters: int, comm_dtype: str, memory_gbs: float) -> float:
    """The default per-step distribution overhead: copying the gradients to the
    communication buffer and back at the device's memory bandwidth, in ms."""
    return 1e3 * perfmodel.pack_overhead(parameters, comm_dtype, memory_gbs * 1e9)
