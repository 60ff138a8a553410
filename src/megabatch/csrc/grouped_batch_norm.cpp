// Ghost batch norm: PyTorch's own training-mode BN kernels, run on each of k equal slices
// of the batch (one emulated worker each). Nothing here computes BN.
//
// On a CPU the slices run side by side on the intra-op threads (built with OpenMP, as ATen
// is). Called one by one from Python, each slice's kernel is too small for ATen to split
// over threads, so one core did all of ghost BN's work while the others waited, and each
// input gradient was copied into one tensor. Each slice's kernel runs on one thread, so
// the results are those of the Python loop in nn.py on one thread, whatever the thread
// count (channels-last kernels split a slice over threads and round by how many they get).
//
// On a GPU the slices' kernels are queued one after another on the current stream, as the
// Python loop queues them, with the same results: the loop itself, which a GPU step waits
// on, costs the host a few microseconds per slice here instead of tens in Python.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/native/batch_norm.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <array>
#include <vector>

using at::Tensor;

namespace {

at::ScalarType stat_type(const Tensor& x) {
  return x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 ? at::kFloat : x.scalar_type();
}

// Whether plain ATen kernels run here: no Python dispatch mode is active (a profiler's
// counter, FakeTensorMode, ...) and x is no Python tensor subclass. Otherwise the groups
// run one by one on the calling thread through the dispatcher, as from Python: a mode is
// Python code, which worker threads could not enter while the caller holds the GIL, and
// which must see every op.
bool plain_aten(const Tensor& x) {
  return !c10::impl::TorchDispatchModeTLS::any_modes_set() && !x.key_set().has_any(c10::python_ks);
}

// Runs body(g) for every group g: on one thread per group when there are several (each
// kernel then runs single-threaded inside the parallel region), inline for one group
// (whose kernel then uses every thread itself) or under a Python mode. Worker threads take
// the caller's thread-local state (inference mode, dispatch keys, the profiler's), and the
// ops called in body skip autograd: the backward runs here only when it records no graph.
template <typename Body>
void for_each_group(int64_t k, bool fan_out, const Body& body) {
  if (k == 1 || !fan_out) {  // not through parallel_for, which would mark even one inline call as parallel
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t g = 0; g < k; ++g) body(g);
    return;
  }
  at::ThreadLocalState caller;
  at::parallel_for(0, k, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard same_state(caller);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t g = begin; g < end; ++g) body(g);
  });
}

// Whether ATen's CPU batch-norm backward kernel can be called here: it is the one
// native_batch_norm_backward calls for dense inputs, and unlike the operator it writes into
// tensors it is given. ATen declares its dispatch-table entries under the macros its own x86
// builds define, which kernels.py passes on x86-64; elsewhere the operator runs, and each
// gradient is copied into place.
#if defined(__x86_64__) && defined(HAVE_AVX512_CPU_DEFINITION) && defined(HAVE_AVX2_CPU_DEFINITION)
#define MEGABATCH_ATEN_BACKWARD_KERNEL 1
#else
#define MEGABATCH_ATEN_BACKWARD_KERNEL 0
#endif
constexpr bool kWritesInPlace = MEGABATCH_ATEN_BACKWARD_KERNEL;

}  // namespace

// (y, stats, save_mean, save_invstd), as the Python loop returns them: stats (2, k, C), each
// group's mean and unbiased variance (BN's running-statistics rule with momentum 1 stores
// exactly the batch's figures, from zeros that count 0 times), and the two (k, C) that the
// backward needs.
std::vector<Tensor> forward(const Tensor& x, const c10::optional<Tensor>& weight,
                            const c10::optional<Tensor>& bias, int64_t k, double eps) {
  TORCH_CHECK(k >= 1 && x.size(0) % k == 0, "grouped_batch_norm: ", x.size(0), " images do not split into ",
              k, " groups");
  auto buffer = at::zeros({4, k, x.size(1)}, x.options().dtype(stat_type(x)));
  auto mean = buffer[0], var = buffer[1], save_mean = buffer[2], save_invstd = buffer[3];
  auto y = at::empty_like(x);  // keeps x's memory format: slices along N stay dense
  auto xs = x.chunk(k), ys = y.chunk(k);
  for_each_group(k, plain_aten(x) && x.is_cpu(), [&](int64_t g) {
    auto sm = save_mean[g], si = save_invstd[g];
    at::native_batch_norm_out(ys[g], sm, si, xs[g], weight, bias, mean[g], var[g], true, 1.0, eps);
  });
  return {y, buffer.narrow(0, 0, 2), save_mean, save_invstd};
}

// The backward on a device other than the CPU, as nn.py's Python loop does it there: each
// group's gradients from the operator (which writes into no given tensor), the input
// gradients joined by one cat, the parameter gradients summed by one stack and one sum.
std::vector<Tensor> backward_queued(const Tensor& grad_y, const Tensor& x, const c10::optional<Tensor>& weight,
                                    const Tensor& save_mean, const Tensor& save_invstd, int64_t k, double eps,
                                    std::array<bool, 3> mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto xs = x.chunk(k), gys = grad_y.chunk(k);
  std::vector<Tensor> pieces, weights, biases;
  for (int64_t g = 0; g < k; ++g) {
    auto out = at::native_batch_norm_backward(gys[g], xs[g], weight, {}, {}, save_mean[g], save_invstd[g], true,
                                              eps, mask);
    if (mask[0]) pieces.push_back(std::get<0>(out));
    if (mask[1]) weights.push_back(std::get<1>(out));
    if (mask[2]) biases.push_back(std::get<2>(out));
  }
  auto params = weights;
  params.insert(params.end(), biases.begin(), biases.end());
  Tensor sums;
  if (!params.empty()) {
    auto stacked = at::stack(params);
    sums = stacked.view({static_cast<int64_t>(params.size()) / k, k, stacked.size(1)}).sum(1);
  }
  return {mask[0] ? at::cat(pieces) : Tensor(), mask[1] ? sums[0] : Tensor(), mask[2] ? sums[-1] : Tensor()};
}

// (grad_x, grad_weight, grad_bias), undefined where mask is false.
std::vector<Tensor> backward(const Tensor& grad_y, const Tensor& x, const c10::optional<Tensor>& weight,
                             const Tensor& save_mean, const Tensor& save_invstd, int64_t k, double eps,
                             std::array<bool, 3> mask) {
  if (k == 1) {  // nothing to join
    auto out = at::native_batch_norm_backward(grad_y, x, weight, {}, {}, save_mean[0], save_invstd[0], true,
                                              eps, mask);
    return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
  }
  if (!x.is_cpu()) return backward_queued(grad_y, x, weight, save_mean, save_invstd, k, eps, mask);
  auto grad_x = mask[0] ? at::empty_like(x) : Tensor();
  auto gxs = mask[0] ? grad_x.chunk(k) : std::vector<Tensor>();
  auto xs = x.chunk(k), gys = grad_y.chunk(k);
  auto per_group = at::empty({2, k, x.size(1)}, save_mean.options());  // each group's dweight, dbias
  // Where x and grad_y are dense in one layout, ATen's CPU kernel writes each group's
  // gradients into place; otherwise the operator computes them (after making them dense)
  // and the thread copies them into place while they are in its core's cache.
  // (The kernel reads and writes the parameters' gradients as save_mean's type: the
  // operator's own rule, which the forward already held to.)
  auto layout = x.suggest_memory_format();
  bool dense = x.is_contiguous(layout) && grad_y.is_contiguous(layout);
  bool types_agree = !weight.has_value() || !weight->defined() || weight->scalar_type() == save_mean.scalar_type();
  bool plain = plain_aten(x) && plain_aten(grad_y);
  bool in_place = kWritesInPlace && plain && dense && types_agree;
  auto weight_ = weight.value_or(Tensor());
  for_each_group(k, plain, [&](int64_t g) {
    Tensor none, gx = mask[0] ? gxs[g] : none, gw = mask[1] ? per_group[0][g] : none,
                 gb = mask[2] ? per_group[1][g] : none;
    if (in_place) {  // ATen's dispatch picks the kernel for this CPU, as for the operator
#if MEGABATCH_ATEN_BACKWARD_KERNEL
      at::native::batch_norm_cpu_backward_stub(at::kCPU, gx, gw, gb, gys[g], xs[g], weight_, none, none,
                                               save_mean[g], save_invstd[g], true, eps);
      return;
#endif
    }
    auto out = at::native_batch_norm_backward(gys[g], xs[g], weight, {}, {}, save_mean[g], save_invstd[g], true,
                                              eps, mask);
    if (mask[0]) gx.copy_(std::get<0>(out));
    if (mask[1]) gw.copy_(std::get<1>(out));
    if (mask[2]) gb.copy_(std::get<2>(out));
  });
  auto sums = (mask[1] || mask[2]) ? per_group.sum(1) : Tensor();
  return {grad_x, mask[1] ? sums[0] : Tensor(), mask[2] ? sums[1] : Tensor()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megabatch's ghost batch norm: PyTorch's BN kernel per group (on a CPU, groups in parallel)";
  // The GIL is released while the groups run (the arguments are converted before, the
  // results after), so that other Python threads, such as a data loader's, go on.
  m.def("forward", &forward, py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, py::call_guard<py::gil_scoped_release>());
  m.def("writes_in_place", [] { return kWritesInPlace; },
        "whether the backward writes each group's gradients into place (else it copies them)");
  m.def("group_threads", [](int64_t k) {
    std::vector<int64_t> threads(k);
    for_each_group(k, true, [&](int64_t g) { threads[g] = at::get_thread_num(); });
    return threads;
  }, "the intra-op thread that runs each of k groups (for tests)");
}
