// Autograd of the fused LoRA linear in C++: peftfast::lora_group, the eager training path of patched LoRA layers
// on CPU. The same kernels (lora_group_fwd / lora_group_bwd, csrc/lora.cpp), saved tensors and gradients as the
// Python autograd.Function in peftfast/ops/lora.py (_LoRAGroupOpFunction), whose per-call Python (the Function's
// forward and backward, ctx bookkeeping, the bias sums) cost a small-shape call more than its GEMMs: here a call is
// one dispatch into C++ and its backward a C++ node. Where a recompute region hands the low-rank product around
// (peftfast.ops.recompute) or under torch.compile, the Python path runs instead.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace peftfast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<std::vector<Tensor>, Tensor> call_fwd(const Tensor& x, at::TensorList ws, at::TensorList bs,
                                                 at::TensorList lbs, at::TensorList as, at::TensorList bms,
                                                 at::ArrayRef<double> scales, double p, const Tensor& seed,
                                                 bool keep_xa) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("peftfast::lora_group_fwd", "")
                       .typed<std::tuple<std::vector<Tensor>, Tensor>(
                           const Tensor&, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                           at::TensorList, at::ArrayRef<double>, double, const Tensor&, bool)>();
  return op.call(x, ws, bs, lbs, as, bms, scales, p, seed, keep_xa);
}

std::tuple<Tensor, Tensor, std::vector<Tensor>> call_bwd(const Tensor& x, const Tensor& xa,
                                                         const c10::List<std::optional<Tensor>>& grads,
                                                         at::TensorList ws, at::TensorList as, at::TensorList bms,
                                                         at::ArrayRef<double> scales, double p, const Tensor& seed,
                                                         bool need_x, bool need_a, at::IntArrayRef need_b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("peftfast::lora_group_bwd", "")
                       .typed<std::tuple<Tensor, Tensor, std::vector<Tensor>>(
                           const Tensor&, const Tensor&, const c10::List<std::optional<Tensor>>&, at::TensorList,
                           at::TensorList, at::TensorList, at::ArrayRef<double>, double, const Tensor&, bool, bool,
                           at::IntArrayRef)>();
  return op.call(x, xa, grads, ws, as, bms, scales, p, seed, need_x, need_a, need_b);
}

std::vector<int64_t> dtypes_of(at::TensorList ts) {
  std::vector<int64_t> out;
  out.reserve(ts.size());
  for (const Tensor& t : ts) out.push_back(static_cast<int64_t>(t.scalar_type()));
  return out;
}

// Inputs, flattened as autograd sees them (each list element is one input): x, the n base weights, the n base
// biases, the n LoRA biases, the n lora_A, the n lora_B, then scales, p, seed and keep_xa. An absent bias is an
// empty tensor that needs no gradient.
struct LoRAGroupFunction : public torch::autograd::Function<LoRAGroupFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, at::TensorList ws, at::TensorList bs,
                               at::TensorList lbs, at::TensorList as, at::TensorList bms, std::vector<double> scales,
                               double p, const Tensor& seed, bool keep_xa) {
    std::vector<Tensor> ys;
    Tensor xa;
    {
      // straight to the kernels: the ops' own (Python) autograd registration is for torch.compile's traces
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(ys, xa) = call_fwd(x, ws, bs, lbs, as, bms, scales, p, seed, keep_xa);
    }
    const int64_t n = static_cast<int64_t>(ws.size());
    variable_list saved{x, keep_xa ? xa : xa.new_empty({0}), seed};
    saved.insert(saved.end(), ws.begin(), ws.end());
    saved.insert(saved.end(), as.begin(), as.end());
    saved.insert(saved.end(), bms.begin(), bms.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["n"] = n;
    ctx->saved_data["p"] = p;
    ctx->saved_data["scales"] = c10::List<double>(scales);
    ctx->saved_data["b_dtypes"] = c10::List<int64_t>(dtypes_of(bs));
    ctx->saved_data["lb_dtypes"] = c10::List<int64_t>(dtypes_of(lbs));
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined: the kernel skips its member
    return ys;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t n = ctx->saved_data["n"].toInt();
    const double p = ctx->saved_data["p"].toDouble();
    const std::vector<double> scales = ctx->saved_data["scales"].toDoubleVector();
    const std::vector<int64_t> b_dtypes = ctx->saved_data["b_dtypes"].toIntVector();
    const std::vector<int64_t> lb_dtypes = ctx->saved_data["lb_dtypes"].toIntVector();
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& xa = saved[1];
    const Tensor& seed = saved[2];
    const std::vector<Tensor> ws(saved.begin() + 3, saved.begin() + 3 + n);
    const std::vector<Tensor> as(saved.begin() + 3 + n, saved.begin() + 3 + 2 * n);
    const std::vector<Tensor> bms(saved.begin() + 3 + 2 * n, saved.begin() + 3 + 3 * n);
    // edges: x, then per list its n members in order (weights, biases, LoRA biases, A, B), then seed
    auto need = [&](int64_t list, int64_t i) { return ctx->needs_input_grad(1 + list * n + i); };
    const bool need_x = ctx->needs_input_grad(0);
    bool need_a = false;
    std::vector<int64_t> need_b(n);
    c10::List<std::optional<Tensor>> dys;
    for (int64_t i = 0; i < n; ++i) {
      need_a = need_a || need(3, i);
      need_b[i] = need(4, i) ? 1 : 0;
      dys.push_back(grads[i].defined() ? std::optional<Tensor>(grads[i]) : std::nullopt);
    }
    Tensor dx, da;
    std::vector<Tensor> dbs;
    {
      // create_graph=True: through the op's registered autograd, whose node refuses a second backward clearly
      std::optional<at::AutoDispatchBelowADInplaceOrView> below;
      if (!at::GradMode::is_enabled()) below.emplace();
      std::tie(dx, da, dbs) = call_bwd(x, xa, dys, ws, as, bms, scales, p, seed, need_x, need_a, need_b);
    }
    variable_list out(5 * n + 5);  // + scales, p, seed, keep_xa: no gradient
    if (need_x) out[0] = dx;
    const int64_t r = as[0].size(0);
    for (int64_t i = 0; i < n; ++i) {
      if (need(3, i)) out[1 + 3 * n + i] = da.narrow(0, i * r, r);
      if (!grads[i].defined()) continue;
      const Tensor& dy = grads[i];
      if (need(1, i)) out[1 + n + i] = dy.sum(0).to(static_cast<at::ScalarType>(b_dtypes[i]));
      if (need(2, i)) {
        // one rounding: reduce and scale in fp32 at least (the LoRA dtype if wider), as the Python path does
        const auto lbt = static_cast<at::ScalarType>(lb_dtypes[i]);
        const auto acc = at::promote_types(at::promote_types(dy.scalar_type(), lbt), at::kFloat);
        out[1 + 2 * n + i] = dy.sum(0, false, acc).mul_(scales[i]).to(lbt);
      }
      if (need(4, i)) out[1 + 4 * n + i] = dbs[i];
    }
    return out;
  }
};

std::vector<Tensor> lora_group_autograd(const Tensor& x, at::TensorList ws, at::TensorList bs, at::TensorList lbs,
                                        at::TensorList as, at::TensorList bms, at::ArrayRef<double> scales, double p,
                                        const Tensor& seed, bool keep_xa) {
  return LoRAGroupFunction::apply(x, ws, bs, lbs, as, bms, scales.vec(), p, seed, keep_xa);
}

// below autograd (dispatch modes, fake tensors): the forward op's outputs without xa
std::vector<Tensor> lora_group_plain(const Tensor& x, at::TensorList ws, at::TensorList bs, at::TensorList lbs,
                                     at::TensorList as, at::TensorList bms, at::ArrayRef<double> scales, double p,
                                     const Tensor& seed, bool keep_xa) {
  return std::get<0>(call_fwd(x, ws, bs, lbs, as, bms, scales, p, seed, keep_xa));
}

}  // namespace
}  // namespace peftfast

TORCH_LIBRARY_IMPL(peftfast, Autograd, m) { m.impl("lora_group", &peftfast::lora_group_autograd); }

TORCH_LIBRARY_IMPL(peftfast, CompositeExplicitAutograd, m) { m.impl("lora_group", &peftfast::lora_group_plain); }
