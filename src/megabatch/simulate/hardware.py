"""Hardware presets for ``megabatch simulate``: every figure with where it comes from.

Only public figures: spec sheets, published benchmarks, NCCL's own cost model.
None of them was chosen by comparing predictions with the records in
docs/performance-model.md. Bandwidths are in Gbit/s, one direction: the intra-node
figure is what one GPU can push to its ring neighbour (NCCL's "bus bandwidth"),
the inter-node one is a node's network adapters together.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

IMAGENET_TRAIN = 1_281_167
IMAGENET_VAL = 50_000

# Trainable parameters as torchvision (and megabatch.models) builds them.
MODELS = {
    "small-cnn": 24_058,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}

# Shared sources, cited once here.
NCCL_TOPO = "NCCL's topology model, src/graph/topo.h (github.com/NVIDIA/nccl)"
NCCL_TUNING = "NCCL's cost model, src/graph/tuning.cc hwLat, Ring/Simple protocol"
TF_BENCH = ("TensorFlow benchmarks (tensorflow.org/performance/benchmarks, 2017): ResNet-50 "
            "on one P100 SXM2 of a DGX-1, batch 32, synthetic data: 195 images/s")
DLE_RN50 = ("NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5 README, training "
            "performance, 1 GPU, mixed precision, pytorch-21.03")
DDP = "PyTorch DDP all-reduces gradient buckets during backward (Li et al., VLDB 2020)"
AMP_FP32 = "PyTorch AMP keeps fp32 weights, so DDP all-reduces fp32 gradients"
NO_INPUT_LIMIT = "not modelled: DALI decodes on the GPU; pass --input-images-per-sec-per-node"


@dataclass(frozen=True)
class Figure:
    """One input to the model and where it comes from."""

    value: float | int | str | None
    source: str


@dataclass(frozen=True)
class Preset:
    """A cluster and the software that ran on it."""

    name: str
    title: str
    gpus: Figure
    gpus_per_node: Figure
    images_per_sec_per_gpu: Figure
    per_gpu_batch: Figure
    intra_node_gbps: Figure
    inter_node_gbps: Figure
    intra_latency_us: Figure
    latency_us: Figure
    memory_gbs: Figure
    """Device memory bandwidth, GB/s: prices copying gradients to and from the buffer."""
    overlap: Figure
    comm_dtype: Figure
    allreduce: Figure
    input_images_per_sec_per_node: Figure

    def figures(self) -> dict[str, Figure]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), Figure)}


def _nvlink(links: int, per_link: float, macro: str) -> Figure:
    return Figure(links * per_link * 8,
                  f"{links} NVLinks x {per_link} GB/s ({macro} in {NCCL_TOPO})")


MN1 = Preset(
    name="mn1",
    title="MN-1 (Preferred Networks, 2017): 128 nodes x 8 P100 PCIe, 2 x InfiniBand FDR",
    gpus=Figure(1024, "Akiba et al. 2017; PFN blog 'MN-1: a GPU cluster behind 15-min "
                      "ImageNet' (2017-11-30): 128 nodes x 8 P100"),
    gpus_per_node=Figure(8, "PFN blog (2017-11-30)"),
    images_per_sec_per_gpu=Figure(
        round(195 * 9.3 / 10.6, 1),
        f"{TF_BENCH}; x 9.3/10.6, the FP32 peak of the PCIe P100 over the SXM2 one (NVIDIA "
        "P100 datasheet). MN-1 has the PCIe part: 4.7 TFLOPS FP64 per GPU (PFN blog)"),
    per_gpu_batch=Figure(32, "Akiba et al. 2017: 1024 workers x 32 images"),
    intra_node_gbps=Figure(
        6.0 * 8, f"QPI_BW = 6 GB/s ({NCCL_TOPO}): assumes the usual dual-socket node, 4 GPUs "
                 "per socket, so the ring crosses QPI once; MN-1's PCIe layout is not "
                 "published (all GPUs under one socket: PCI_BW = 12 GB/s)"),
    inter_node_gbps=Figure(
        round(2 * 56.25 * 64 / 66, 1), "2 x InfiniBand FDR 4x per node (PFN blog: 56 Gbps x 2): "
                             "56.25 Gbaud with 64b/66b encoding = 54.5 Gb/s each"),
    intra_latency_us=Figure(5.7, f"PCI, {NCCL_TUNING}"),
    latency_us=Figure(14.0, f"NET, {NCCL_TUNING}"),
    memory_gbs=Figure(732, "P100 16 GB HBM2, NVIDIA P100 datasheet"),
    overlap=Figure(0.0, "ChainerMN of 2017 all-reduces after backward; double buffering "
                        "arrived in ChainerMN v1.2 (Chainer blog, 2018-05-25)"),
    comm_dtype=Figure("fp16", "Akiba et al. 2017: half-precision all-reduce"),
    allreduce=Figure("ring", "PFN blog: 'In the 15-minute trial, we used the ring allreduce "
                             "algorithm' (NCCL 2.0.5)"),
    input_images_per_sec_per_node=Figure(
        None, "not modelled: Chainer's ImageNet example reads images pre-resized to 256 px "
              "and no public per-core figure exists for it"),
)

BIGBASIN_P100 = Preset(
    name="bigbasin-p100",
    title="Big Basin (Facebook, 2017): 8 P100 SXM2 with NVLink per server, 50 Gbit Ethernet",
    gpus=Figure(256, "Goyal et al. 2017 (arXiv:1706.02677): 256 GPUs, 32 servers"),
    gpus_per_node=Figure(8, "Goyal et al. 2017, section 5: 8 P100 per Big Basin server"),
    images_per_sec_per_gpu=Figure(195.0, TF_BENCH),
    per_gpu_batch=Figure(32, "Goyal et al. 2017: 32 images per GPU"),
    intra_node_gbps=_nvlink(4, 18.0, "SM60_NVLINK_BW"),
    inter_node_gbps=Figure(50.0, "Goyal et al. 2017: one Mellanox ConnectX-4 50 Gbit "
                                 "Ethernet adapter per server"),
    intra_latency_us=Figure(3.4, f"NVLink, {NCCL_TUNING}"),
    latency_us=Figure(14.0, f"NET, {NCCL_TUNING} (Gloo over TCP has no published figure)"),
    memory_gbs=Figure(732, "P100 16 GB HBM2, NVIDIA P100 datasheet"),
    overlap=Figure(1.0, "Goyal et al. 2017: gradient aggregation runs in parallel with backprop"),
    comm_dtype=Figure("fp32", "Goyal et al. 2017: fp32 gradients"),
    allreduce=Figure("hierarchical", "Goyal et al. 2017: reduce in the server, recursive "
                                     "halving/doubling across servers, broadcast; priced with a "
                                     "ring across servers (the same bytes, 2(N-1) latency steps "
                                     "for its 2 log2 N: 0.7 ms more at 32 servers, hidden by overlap)"),
    input_images_per_sec_per_node=Figure(None, "not modelled: Caffe2 reading from local NVMe"),
)

DGX1_V100 = Preset(
    name="dgx1-v100",
    title="DGX-1 cluster: 8 V100 SXM2 (NVLink) per node, 4 x InfiniBand EDR",
    gpus=Figure(1024, "a 128-node cluster, the size of MN-1"),
    gpus_per_node=Figure(8, "NVIDIA DGX-1 datasheet"),
    images_per_sec_per_gpu=Figure(1200.0, f"{DLE_RN50}: DGX-1, 1 x V100 16 GB"),
    per_gpu_batch=Figure(256, "the batch of the DeepLearningExamples figure"),
    intra_node_gbps=_nvlink(6, 20.0, "SM70_NVLINK_BW"),
    inter_node_gbps=Figure(4 * 100.0, "NVIDIA DGX-1 datasheet: 4 x InfiniBand EDR 100 Gb/s"),
    intra_latency_us=Figure(3.4, f"NVLink, {NCCL_TUNING}"),
    latency_us=Figure(14.0, f"NET, {NCCL_TUNING}"),
    memory_gbs=Figure(900, "V100 SXM2 datasheet"),
    overlap=Figure(1.0, DDP),
    comm_dtype=Figure("fp32", AMP_FP32),
    allreduce=Figure("ring", "NCCL's ring"),
    input_images_per_sec_per_node=Figure(None, NO_INPUT_LIMIT),
)

DGX_A100 = Preset(
    name="dgx-a100",
    title="DGX A100 cluster: 8 A100 80 GB (NVSwitch) per node, 8 x InfiniBand HDR",
    gpus=Figure(1024, "a 128-node cluster, the size of MN-1"),
    gpus_per_node=Figure(8, "NVIDIA DGX A100 datasheet"),
    images_per_sec_per_gpu=Figure(2470.0, f"{DLE_RN50}: DGX A100, 1 x A100 80 GB"),
    per_gpu_batch=Figure(256, "the batch of the DeepLearningExamples figure"),
    intra_node_gbps=_nvlink(12, 20.0, "SM80_NVLINK_BW"),
    inter_node_gbps=Figure(8 * 200.0, "NVIDIA DGX A100 datasheet: 8 x ConnectX-6 HDR 200 Gb/s "
                                      "for the compute fabric"),
    intra_latency_us=Figure(3.4, f"NVLink, {NCCL_TUNING}"),
    latency_us=Figure(14.0, f"NET, {NCCL_TUNING}"),
    memory_gbs=Figure(2039, "A100 80 GB SXM datasheet"),
    overlap=Figure(1.0, DDP),
    comm_dtype=Figure("fp32", AMP_FP32),
    allreduce=Figure("ring", "NCCL's ring"),
    input_images_per_sec_per_node=Figure(None, NO_INPUT_LIMIT),
)

DGX_H100 = Preset(
    name="dgx-h100",
    title="DGX H100 cluster: 8 H100 SXM5 (NVSwitch) per node, 8 x InfiniBand NDR",
    gpus=Figure(1024, "a 128-node cluster, the size of MN-1"),
    gpus_per_node=Figure(8, "NVIDIA DGX H100 datasheet"),
    images_per_sec_per_gpu=Figure(
        round(2470 * 3350 / 2039, 1),
        "estimate, no published single-H100 ResNet-50 training figure found: the A100 80 GB "
        f"figure ({DLE_RN50}) x 3.35/2.039 TB/s, the memory bandwidth ratio (datasheets); "
        "measure it with megabatch bench and pass --from-bench"),
    per_gpu_batch=Figure(256, "the batch of the DeepLearningExamples figure"),
    intra_node_gbps=_nvlink(18, 20.6, "SM90_NVLINK_BW"),
    inter_node_gbps=Figure(8 * 400.0, "NVIDIA DGX H100 datasheet: 8 x ConnectX-7 NDR 400 Gb/s "
                                      "for the compute fabric"),
    intra_latency_us=Figure(3.4, f"NVLink, {NCCL_TUNING}"),
    latency_us=Figure(14.0, f"NET, {NCCL_TUNING}"),
    memory_gbs=Figure(3350, "H100 SXM5 datasheet"),
    overlap=Figure(1.0, DDP),
    comm_dtype=Figure("fp32", AMP_FP32),
    allreduce=Figure("ring", "NCCL's ring"),
    input_images_per_sec_per_node=Figure(None, NO_INPUT_LIMIT),
)

ABCI_V100 = Preset(
    name="abci-v100",
    title="ABCI (AIST, 2018): 1,088 nodes x 4 V100 SXM2 (NVLink), 2 x InfiniBand EDR",
    gpus=Figure(2048, "Yamazaki et al. 2019 (arXiv:1903.12650): 2,048 GPUs of ABCI"),
    gpus_per_node=Figure(4, "ABCI system overview (AIST, abci.ai): 4 NVIDIA V100 SXM2 16 GB "
                            "per compute node"),
    images_per_sec_per_gpu=Figure(
        1376.0, "NVIDIA DeepLearningExamples, MXNet ResNet-50 v1.5 README, training performance, "
                "DGX-1, 1 x V100 16 GB, mixed precision, batch 192, mxnet-20.12"),
    per_gpu_batch=Figure(40, "Yamazaki et al. 2019: 81,920 images over 2,048 GPUs"),
    intra_node_gbps=_nvlink(6, 20.0, "SM70_NVLINK_BW"),
    inter_node_gbps=Figure(2 * 100.0, "ABCI system overview: 2 x InfiniBand EDR 100 Gb/s per node"),
    intra_latency_us=Figure(3.4, f"NVLink, {NCCL_TUNING}"),
    latency_us=Figure(14.0, f"NET, {NCCL_TUNING}"),
    memory_gbs=Figure(900, "V100 SXM2 datasheet"),
    overlap=Figure(1.0, "Horovod all-reduces gradients as backward produces them (Sergeev and "
                        "Del Balso 2018, arXiv:1802.05799)"),
    comm_dtype=Figure("fp16", "mixed precision (Yamazaki et al. 2019); fp16 gradients on the "
                              "wire not confirmed"),
    allreduce=Figure("tree", "NCCL 2.4 (February 2019) added trees and picks them at this scale; "
                             "the paper's algorithm is not confirmed here"),
    input_images_per_sec_per_node=Figure(None, NO_INPUT_LIMIT),
)

PRESETS: dict[str, Preset] = {p.name: p for p in (MN1, BIGBASIN_P100, DGX1_V100, DGX_A100, DGX_H100,
                                                  ABCI_V100)}
