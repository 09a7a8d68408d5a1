// Torch binding of the CUDA WKV kernels: checks every tensor (device, dtype, shape, contiguity),
// allocates the float32 outputs, launches on the current stream of the inputs' device, and
// registers the operators torch.ops.rwkv_cli.wkv{4,5,7}_cuda. Each takes one sequence, or a batch
// of B with a leading dimension B on the state and the token inputs (not on the model's w and u).
// rwkv_cli/kernels/cuda.py brings arguments into this form; the semantics are those of
// rwkv_cli/kernels/wkv{4,5,7}.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <initializer_list>
#include <tuple>
#include <vector>

#include "cuda_wkv.h"

namespace rwkv_cli {
namespace {

using at::Tensor;

// Token inputs: one of the three types the kernels read, the same for all of them.
Element element_of(const Tensor& x, const char* op) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return Element::f32;
    case at::kHalf:
      return Element::f16;
    case at::kBFloat16:
      return Element::bf16;
    default:
      break;
  }
  TORCH_CHECK_TYPE(false, op, ": inputs must be float32, float16 or bfloat16, got ",
                   x.scalar_type());
  return Element::f32;  // not reached
}

void check_tensor(const char* op, const char* name, const Tensor& x, const at::Device& device,
                  at::IntArrayRef shape) {
  TORCH_CHECK(x.is_cuda(), op, ": ", name, " must be on a CUDA device, got ", x.device());
  TORCH_CHECK(x.device() == device, op, ": ", name, " is on ", x.device(), ", the others on ",
              device);
  TORCH_CHECK(x.sizes() == shape, op, ": ", name, " has shape ", x.sizes(), ", expected ",
              shape);
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_float32(const char* op, const char* name, const Tensor& x, const at::Device& device,
                   at::IntArrayRef shape) {
  check_tensor(op, name, x, device, shape);
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              x.scalar_type());
}

void check_input(const char* op, const char* name, const Tensor& x, const Tensor& first,
                 at::IntArrayRef shape) {
  check_tensor(op, name, x, first.device(), shape);
  TORCH_CHECK(x.scalar_type() == first.scalar_type(), op, ": ", name, " is ", x.scalar_type(),
              " but the other token inputs are ", first.scalar_type());
}

void check_launch(const char* op, cudaError_t error) {
  TORCH_CHECK(error == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(error));
}

int as_int(const char* op, int64_t size) {
  TORCH_CHECK(size <= INT32_MAX, op, ": size ", size, " is too large");
  return static_cast<int>(size);
}

// The batch dimensions of token inputs x, which have `dims` dimensions for one sequence and a
// leading B for a batch: {} or {B}. `layout` names one sequence's dimensions, as "T, C".
at::IntArrayRef batch_dims(const char* op, const char* name, const Tensor& x, int64_t dims,
                           const char* layout) {
  TORCH_CHECK(x.dim() == dims || x.dim() == dims + 1, op, ": ", name, " must be (", layout,
              ") or (B, ", layout, "), got shape ", x.sizes());
  return x.sizes().slice(0, x.dim() - dims);
}

// The sequences in a batch of `batch` dimensions ({} for one sequence), as the launchers take it.
int batch_size(const char* op, at::IntArrayRef batch) {
  const int64_t size = batch.empty() ? 1 : batch[0];
  TORCH_CHECK(size <= WKV_MAX_BATCH, op, ": a batch of ", size, " sequences is more than ",
              WKV_MAX_BATCH);
  return static_cast<int>(size);
}

// One sequence's `shape` with the batch dimensions in front.
std::vector<int64_t> batched(at::IntArrayRef batch, std::initializer_list<int64_t> shape) {
  std::vector<int64_t> result(batch.begin(), batch.end());
  result.insert(result.end(), shape);
  return result;
}

struct Heads {
  int batch, tokens, heads, size;
};

// (B, T, H, N) or (T, H, N) token inputs and the matching (B, H, N, N) or (H, N, N) float32 state
// of RWKV-5/6/7.
Heads check_heads(const char* op, const Tensor& state, const Tensor& r) {
  const at::IntArrayRef batch = batch_dims(op, "r", r, 3, "T, H, N");
  const int64_t tokens = r.size(-3), heads = r.size(-2), size = r.size(-1);
  TORCH_CHECK(wkv_head_size_supported(static_cast<int>(size)), op, ": head size ", size,
              " is not compiled in (16, 32, 64 or 128)");
  check_input(op, "r", r, r, r.sizes());
  check_float32(op, "state", state, r.device(), batched(batch, {heads, size, size}));
  return {batch_size(op, batch), as_int(op, tokens), as_int(op, heads), static_cast<int>(size)};
}

Tensor float32_like(const Tensor& x) { return at::empty(x.sizes(), x.options().dtype(at::kFloat)); }

std::tuple<Tensor, Tensor, Tensor, Tensor> wkv4_cuda(const Tensor& aa, const Tensor& bb,
                                                     const Tensor& pp, const Tensor& w,
                                                     const Tensor& u, const Tensor& k,
                                                     const Tensor& v) {
  const char* op = "wkv4_cuda";
  const at::IntArrayRef batch = batch_dims(op, "k", k, 2, "T, C");
  const int64_t channels = k.size(-1);
  check_input(op, "k", k, k, k.sizes());
  check_input(op, "v", v, k, k.sizes());
  const std::vector<int64_t> state_shape = batched(batch, {channels});
  check_float32(op, "aa", aa, k.device(), state_shape);
  check_float32(op, "bb", bb, k.device(), state_shape);
  check_float32(op, "pp", pp, k.device(), state_shape);
  check_float32(op, "w", w, k.device(), {channels});  // w and u are the model's, for every sequence
  check_float32(op, "u", u, k.device(), {channels});

  const c10::cuda::CUDAGuard guard(k.device());
  Tensor y = float32_like(k), aa_out = at::empty_like(aa), bb_out = at::empty_like(bb),
         pp_out = at::empty_like(pp);
  check_launch(op, wkv4_forward(element_of(k, op), batch_size(op, batch), as_int(op, k.size(-2)),
                                as_int(op, channels), w.data_ptr<float>(), u.data_ptr<float>(),
                                k.data_ptr(), v.data_ptr(), aa.data_ptr<float>(),
                                bb.data_ptr<float>(), pp.data_ptr<float>(), y.data_ptr<float>(),
                                aa_out.data_ptr<float>(), bb_out.data_ptr<float>(),
                                pp_out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return {y, aa_out, bb_out, pp_out};
}

std::tuple<Tensor, Tensor> wkv5_cuda(const Tensor& state, const Tensor& r, const Tensor& w,
                                     const Tensor& k, const Tensor& v, const Tensor& u) {
  const char* op = "wkv5_cuda";
  const auto [batch, tokens, heads, size] = check_heads(op, state, r);
  check_input(op, "k", k, r, r.sizes());
  check_input(op, "v", v, r, r.sizes());
  check_float32(op, "w", w, r.device(), r.sizes());
  check_float32(op, "u", u, r.device(), {heads, size});

  const c10::cuda::CUDAGuard guard(r.device());
  Tensor y = float32_like(r), state_out = at::empty_like(state);
  check_launch(op, wkv5_forward(element_of(r, op), batch, tokens, heads, size,
                                state.data_ptr<float>(), r.data_ptr(), w.data_ptr<float>(),
                                k.data_ptr(), v.data_ptr(), u.data_ptr<float>(),
                                y.data_ptr<float>(), state_out.data_ptr<float>(),
                                c10::cuda::getCurrentCUDAStream()));
  return {y, state_out};
}

std::tuple<Tensor, Tensor> wkv7_cuda(const Tensor& state, const Tensor& r, const Tensor& w,
                                     const Tensor& k, const Tensor& v, const Tensor& kappa,
                                     const Tensor& a) {
  const char* op = "wkv7_cuda";
  const auto [batch, tokens, heads, size] = check_heads(op, state, r);
  check_input(op, "k", k, r, r.sizes());
  check_input(op, "v", v, r, r.sizes());
  check_input(op, "kappa", kappa, r, r.sizes());
  check_input(op, "a", a, r, r.sizes());
  check_float32(op, "w", w, r.device(), r.sizes());

  const c10::cuda::CUDAGuard guard(r.device());
  Tensor y = float32_like(r), state_out = at::empty_like(state);
  check_launch(op, wkv7_forward(element_of(r, op), batch, tokens, heads, size,
                                state.data_ptr<float>(), r.data_ptr(), w.data_ptr<float>(),
                                k.data_ptr(), v.data_ptr(), kappa.data_ptr(), a.data_ptr(),
                                y.data_ptr<float>(), state_out.data_ptr<float>(),
                                c10::cuda::getCurrentCUDAStream()));
  return {y, state_out};
}

}  // namespace
}  // namespace rwkv_cli

// FRAGMENT: the CPU kernels' extension registers operators in the same namespace.
TORCH_LIBRARY_FRAGMENT(rwkv_cli, m) {
  m.def(
      "wkv4_cuda(Tensor aa, Tensor bb, Tensor pp, Tensor w, Tensor u, Tensor k, Tensor v)"
      " -> (Tensor, Tensor, Tensor, Tensor)",
      &rwkv_cli::wkv4_cuda);
  m.def("wkv5_cuda(Tensor state, Tensor r, Tensor w, Tensor k, Tensor v, Tensor u)"
        " -> (Tensor, Tensor)",
        &rwkv_cli::wkv5_cuda);
  m.def(
      "wkv7_cuda(Tensor state, Tensor r, Tensor w, Tensor k, Tensor v, Tensor kappa, Tensor a)"
      " -> (Tensor, Tensor)",
      &rwkv_cli::wkv7_cuda);
}
