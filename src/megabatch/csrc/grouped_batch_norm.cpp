// Ghost batch norm on a CPU: PyTorch's own training-mode BN kernels, run on each of k
// equal slices of the batch (one emulated worker each) side by side on the intra-op
// threads. Called one by one from Python, each slice's kernel is too small for ATen to
// split it over threads, so one core did all of ghost BN's work while the others waited.
// Nothing here computes BN: the results are bit-identical to the Python loop in nn.py.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/native/batch_norm.h>

#include <array>
#include <vector>

using at::Tensor;

namespace {

at::ScalarType stat_type(const Tensor& x) {
  return x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 ? at::kFloat : x.scalar_type();
}

// Runs body(g) for every group g: on one thread per group when there are several (each
// kernel then runs single-threaded inside the parallel region), inline for one group
// (whose kernel then uses every thread itself). The ops called in body skip autograd:
// worker threads do not inherit the caller's no-grad mode.
template <typename Body>
void for_each_group(int64_t k, const Body& body) {
  if (k == 1) {  // not through parallel_for, which would mark even one inline call as parallel
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    body(0);
    return;
  }
  at::parallel_for(0, k, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t g = begin; g < end; ++g) body(g);
  });
}

// ATen's CPU batch-norm backward kernel for this CPU, the one native_batch_norm_backward
// calls for dense inputs: unlike the operator, it writes into tensors it is given. ATen
// picks it from its dispatch table by the CPU's capability (its picker is not exported);
// this picks the same way, or returns nullptr where the table is not readable here (then
// the operator runs, and each gradient is copied into place).
using BackwardKernel = at::native::batch_norm_backward_fn;

BackwardKernel backward_kernel() {
#if defined(__x86_64__) && defined(HAVE_AVX512_CPU_DEFINITION) && defined(HAVE_AVX2_CPU_DEFINITION)
  using Table = at::native::DispatchStub<BackwardKernel, at::native::batch_norm_cpu_backward_stub_DECLARE_DISPATCH_type>;
  static const BackwardKernel picked = [] {
    auto capability = at::get_cpu_capability();
    if (capability == "AVX512" && Table::AVX512) return Table::AVX512;
    if ((capability == "AVX512" || capability == "AVX2") && Table::AVX2) return Table::AVX2;
    return Table::DEFAULT;
  }();
  return picked;
#else
  return nullptr;
#endif
}

}  // namespace

// (y, mean, var, save_mean, save_invstd): the last four (k, C), as the Python loop returns
// them: each group's mean and unbiased variance (BN's running-statistics rule with momentum
// 1 stores exactly the batch's figures), and what the backward needs.
std::vector<Tensor> forward(const Tensor& x, const c10::optional<Tensor>& weight,
                            const c10::optional<Tensor>& bias, int64_t k, double eps) {
  TORCH_CHECK(k >= 1 && x.size(0) % k == 0, "grouped_batch_norm: ", x.size(0), " images do not split into ",
              k, " groups");
  auto stats = at::empty({4, k, x.size(1)}, x.options().dtype(stat_type(x)));
  auto mean = stats[0], var = stats[1], save_mean = stats[2], save_invstd = stats[3];
  mean.zero_();
  var.fill_(1.0);
  auto y = at::empty_like(x);  // keeps x's memory format: slices along N stay dense
  auto xs = x.chunk(k), ys = y.chunk(k);
  for_each_group(k, [&](int64_t g) {
    auto sm = save_mean[g], si = save_invstd[g];
    at::native_batch_norm_out(ys[g], sm, si, xs[g], weight, bias, mean[g], var[g], true, 1.0, eps);
  });
  return {y, mean, var, save_mean, save_invstd};
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
  auto kernel = dense && types_agree ? backward_kernel() : nullptr;
  auto weight_ = weight.value_or(Tensor());
  for_each_group(k, [&](int64_t g) {
    Tensor none, gx = mask[0] ? gxs[g] : none, gw = mask[1] ? per_group[0][g] : none,
                 gb = mask[2] ? per_group[1][g] : none;
    if (kernel) {
      kernel(gx, gw, gb, gys[g], xs[g], weight_, none, none, save_mean[g], save_invstd[g], true, eps);
      return;
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
  m.doc() = "megabatch's ghost batch norm on a CPU: PyTorch's BN kernel per group, groups in parallel";
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("writes_in_place", [] { return backward_kernel() != nullptr; },
        "whether the backward writes each group's gradients into place (else it copies them)");
}
