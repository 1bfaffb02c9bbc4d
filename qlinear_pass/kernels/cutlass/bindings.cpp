// PyTorch binding of one CUTLASS kernel family: checks the tensors, then calls the
// C entry points of qlp_gemm.h on the current stream.  Built once per family with
// -DQLP_FAMILY_FP8, -DQLP_FAMILY_INT8, -DQLP_FAMILY_FP8_BLOCK, -DQLP_FAMILY_W4A16,
// -DQLP_FAMILY_INT8_WO or -DQLP_FAMILY_FP8_WO.
#include <torch/extension.h>

#include <cuda_runtime.h>

#if __has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define QLP_TORCH_CUDA 1
#else  // a CPU-only torch: enough to compile-check this file (cutlass_build.py --compile-only)
#define QLP_TORCH_CUDA 0
#endif

#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "qlp_gemm.h"

namespace {

// Error messages are assembled from std::string pieces and thrown as std::runtime_error (a Python
// RuntimeError), not formatted by TORCH_CHECK's ostream: no stream or locale code runs on this
// library's error paths.  (On the GPU machine a process once crashed inside libstdc++'s locale code
// while TORCH_CHECK formatted a tensor's sizes here: the signature of two libstdc++ copies in one
// process, which a user's environment may have too.)
std::string piece(const char* s) { return s; }
std::string piece(const std::string& s) { return s; }
template <class T, std::enable_if_t<std::is_integral<T>::value, int> = 0>
std::string piece(T v) { return std::to_string(v); }
std::string piece(at::ScalarType t) { return c10::toString(t); }
std::string piece(const c10::Device& d) { return d.str(); }
std::string piece(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::string msg;
  ((msg += piece(parts)), ...);
  throw std::runtime_error(msg);
}

#define QLP_CHECK(cond, ...) \
  do {                       \
    if (!(cond)) fail(__VA_ARGS__); \
  } while (0)

#if defined(QLP_FAMILY_FP8)
constexpr const char* kFamily = "fp8";
const auto kOperand = at::kFloat8_e4m3fn;
constexpr bool kBlock = false;
#elif defined(QLP_FAMILY_INT8)
constexpr const char* kFamily = "int8";
const auto kOperand = at::kChar;
constexpr bool kBlock = false;
#elif defined(QLP_FAMILY_FP8_BLOCK)
constexpr const char* kFamily = "fp8_block";
const auto kOperand = at::kFloat8_e4m3fn;
constexpr bool kBlock = true;
#elif defined(QLP_FAMILY_W4A16)
constexpr const char* kFamily = "w4a16";
#elif defined(QLP_FAMILY_INT8_WO)
constexpr const char* kFamily = "int8_wo";
const auto kWeight = at::kChar;
#elif defined(QLP_FAMILY_FP8_WO)
constexpr const char* kFamily = "fp8_wo";
const auto kWeight = at::kFloat8_e4m3fn;
#else
#error "define QLP_FAMILY_FP8, QLP_FAMILY_INT8, QLP_FAMILY_FP8_BLOCK, QLP_FAMILY_W4A16, QLP_FAMILY_INT8_WO or QLP_FAMILY_FP8_WO"
#endif
#if defined(QLP_FAMILY_INT8_WO) || defined(QLP_FAMILY_FP8_WO)
#define QLP_WEIGHT_ONLY_8BIT 1
#endif

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int sm_count(int device) {
  static int counts[64] = {0};
  if (device < 0 || device >= 64) return 0;  // 0: CUTLASS asks the driver itself
  if (counts[device] == 0) {
    int n = 0;
    const cudaError_t err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    QLP_CHECK(err == cudaSuccess, "qlinear_pass cutlass: ", cudaGetErrorString(err));
    counts[device] = n;
  }
  return counts[device];
}

void check_matrix(const torch::Tensor& t, const char* name, at::ScalarType dtype, const torch::Tensor& like) {
  QLP_CHECK(t.is_cuda() && t.device() == like.device(), "qlinear_pass cutlass ", kFamily, ": ", name,
              " must be a CUDA tensor", t.is_cuda() ? " on the device of a" : "", ", got one on ", t.device());
  QLP_CHECK(t.dim() == 2, "qlinear_pass cutlass ", kFamily, ": ", name, " must be 2-D, got ", t.sizes());
  QLP_CHECK(t.scalar_type() == dtype, "qlinear_pass cutlass ", kFamily, ": ", name, " must be ", dtype,
              ", got ", t.scalar_type());
  QLP_CHECK(t.is_contiguous(), "qlinear_pass cutlass ", kFamily, ": ", name, " must be contiguous");
  QLP_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "qlinear_pass cutlass ", kFamily, ": ", name,
              " must start on a 16-byte boundary (TMA)");
}

void check_scale(const torch::Tensor& s, const char* name, int64_t numel, const torch::Tensor& like) {
  QLP_CHECK(s.is_cuda() && s.device() == like.device(), "qlinear_pass cutlass ", kFamily, ": ", name,
              " must be a CUDA tensor on the device of a, got one on ", s.device());
  QLP_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous(), "qlinear_pass cutlass ", kFamily, ": ", name,
              " must be contiguous float32");
  QLP_CHECK(s.numel() == numel, "qlinear_pass cutlass ", kFamily, ": ", name, " has ", s.numel(),
              " values, expected ", numel);
}

int config_count() {
  const int n = qlp_config_count_bf16();
  QLP_CHECK(n == qlp_config_count_f16(), "qlinear_pass cutlass ", kFamily,
              ": the bf16 and f16 builds list different tile configurations");
  return n;
}

std::vector<std::string> configs() {
  std::vector<std::string> names;
  for (int i = 0; i < config_count(); ++i) names.emplace_back(qlp_config_name_bf16(i));
  return names;
}

#if QLP_TORCH_CUDA
cudaStream_t current_stream(const torch::Tensor& like) {
  return c10::cuda::getCurrentCUDAStream(like.get_device()).stream();
}
#endif

// Runs configuration `config` of the family on `args`, with a workspace from PyTorch's allocator.
void launch(qlp::GemmArgs& args, const torch::Tensor& like, bool half, int64_t config) {
#if QLP_TORCH_CUDA
  const c10::cuda::CUDAGuard guard(like.device());
  cudaStream_t stream = current_stream(like);
#else
  QLP_CHECK(false, "qlinear_pass cutlass: this torch is built without CUDA");
  cudaStream_t stream = nullptr;
#endif
  const int cfg = int(config);
  const size_t ws_bytes = half ? qlp_workspace_f16(&args, cfg) : qlp_workspace_bf16(&args, cfg);
  torch::Tensor ws;
  if (ws_bytes) ws = torch::empty({int64_t(ws_bytes)}, like.options().dtype(at::kByte));
  void* ws_ptr = ws_bytes ? ws.data_ptr() : nullptr;
  const char* err = half ? qlp_run_f16(&args, cfg, ws_ptr, stream) : qlp_run_bf16(&args, cfg, ws_ptr, stream);
  QLP_CHECK(err == nullptr, "qlinear_pass cutlass ", kFamily, " (GEMM ", args.m, " x ", args.n, " x ", args.k,
            ", tiles ", qlp_config_name_bf16(cfg), "): ", err);
  const cudaError_t launched = cudaGetLastError();
  QLP_CHECK(launched == cudaSuccess, "qlinear_pass cutlass ", kFamily, ": ", cudaGetErrorString(launched));
}

const void* bias_pointer(const c10::optional<torch::Tensor>& bias, const torch::Tensor& out, int64_t n) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  QLP_CHECK(bias->scalar_type() == out.scalar_type() && bias->is_contiguous() && bias->numel() == n &&
                bias->device() == out.device(),
            "qlinear_pass cutlass ", kFamily, ": bias must be a contiguous [N] tensor of the output dtype");
  return bias->data_ptr();
}

void check_config(int64_t config) {
  QLP_CHECK(config >= 0 && config < config_count(), "qlinear_pass cutlass ", kFamily, ": no tile configuration ",
            config, " (the family has ", config_count(), ")");
}

#if defined(QLP_WEIGHT_ONLY_8BIT)
// out[M, N] = (x[M, K] @ w[N, K]^T) * scale[N] + bias[N]: w int8 or fp8 e4m3, scale float32 per channel.
torch::Tensor wo8_gemm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                       const c10::optional<torch::Tensor>& bias, torch::Tensor out, int64_t config) {
  QLP_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, "qlinear_pass cutlass ", kFamily,
            ": x must be bfloat16 or float16, got ", x.scalar_type());
  const auto dt = x.scalar_type();
  check_matrix(x, "x", dt, x);
  check_matrix(w, "w", kWeight, x);
  check_matrix(out, "out", dt, x);
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  QLP_CHECK(w.size(1) == k, "qlinear_pass cutlass ", kFamily, ": x is ", x.sizes(), " but w is ", w.sizes());
  QLP_CHECK(out.size(0) == m && out.size(1) == n, "qlinear_pass cutlass ", kFamily, ": out is ", out.sizes(),
            ", expected [", m, ", ", n, "]");
  QLP_CHECK(n % 8 == 0 && k % 16 == 0, "qlinear_pass cutlass ", kFamily, ": needs N % 8 == 0 and K % 16 == 0 "
            "(16-byte TMA rows of the output and of w), got N=", n, " K=", k);
  check_scale(scale, "scale", n, x);
  QLP_CHECK(m < (int64_t(1) << 31) && n < (int64_t(1) << 31) && k < (int64_t(1) << 31),
            "qlinear_pass cutlass: sizes must fit in int32");
  check_config(config);
  const void* bias_ptr = bias_pointer(bias, out, n);
  if (m == 0) return out;
  // the swapped problem: the GEMM's rows are the weight's N, its columns the activation's M
  qlp::GemmArgs args{w.data_ptr(), x.data_ptr(), out.data_ptr(), scale.data_ptr<float>(), nullptr, bias_ptr,
                     int(n), int(m), int(k), true, false, 0, int(x.get_device()), sm_count(x.get_device())};
  launch(args, x, dt == at::kHalf, config);
  return out;
}

#elif defined(QLP_FAMILY_W4A16)
// out[M, N] = x[M, K] @ dequant(w)^T + bias[N]: w [N/16, K/16, 128] bytes of unsigned 4-bit values in
// the MMA-fragment layout (kernels/int4_layout.py, Mma16Layout in qlp_gemm.cuh), dequantised as
// q * scale + zero per (output channel, group of group_size along K);
// scale and zero are MN-major [K / group_size, N] in x's dtype (zero = -zero_point * scale).
torch::Tensor w4a16_gemm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                         const torch::Tensor& zero, int64_t group_size, const c10::optional<torch::Tensor>& bias,
                         torch::Tensor out, int64_t config) {
  QLP_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
            "qlinear_pass cutlass w4a16: x must be bfloat16 or float16, got ", x.scalar_type());
  const auto dt = x.scalar_type();
  check_matrix(x, "x", dt, x);
  QLP_CHECK(w.is_cuda() && w.device() == x.device() && w.scalar_type() == at::kByte && w.dim() == 3 &&
                w.size(2) == 128 && w.is_contiguous() && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
            "qlinear_pass cutlass w4a16: w must be a contiguous uint8 [N/16, K/16, 128] CUDA tensor (the "
            "MMA-fragment layout) on x's device, starting on a 16-byte boundary; got ", w.scalar_type(), " ",
            w.sizes(), " on ", w.device());
  check_matrix(out, "out", dt, x);
  check_matrix(scale, "scale", dt, x);
  check_matrix(zero, "zero", dt, x);
  const int64_t m = x.size(0), k = x.size(1), n = 16 * w.size(0);
  QLP_CHECK(16 * w.size(1) == k, "qlinear_pass cutlass w4a16: x is ", x.sizes(), " but w is ", w.sizes(),
            " (atoms of 16 rows x 16 k)");
  QLP_CHECK(out.size(0) == m && out.size(1) == n, "qlinear_pass cutlass w4a16: out is ", out.sizes(),
            ", expected [", m, ", ", n, "]");
  QLP_CHECK(group_size >= 64 && group_size % 64 == 0 && k % group_size == 0,
            "qlinear_pass cutlass w4a16: the group size must be a multiple of 64 (the K tile) dividing K, got ",
            group_size, " with K=", k);
  QLP_CHECK(n % 8 == 0 && k % 8 == 0, "qlinear_pass cutlass w4a16: needs N % 8 == 0 and K % 8 == 0 (16-byte TMA "
            "rows of the output and of x), got N=", n, " K=", k);
  QLP_CHECK(scale.size(0) == k / group_size && scale.size(1) == n && zero.sizes() == scale.sizes(),
            "qlinear_pass cutlass w4a16: scale and zero must be [K / group_size, N] = [", k / group_size, ", ", n,
            "], got ", scale.sizes(), " and ", zero.sizes());
  QLP_CHECK(m < (int64_t(1) << 31) && n < (int64_t(1) << 31) && k < (int64_t(1) << 31),
            "qlinear_pass cutlass: sizes must fit in int32");
  check_config(config);
  const void* bias_ptr = bias_pointer(bias, out, n);
  if (m == 0) return out;
  // the swapped problem: the GEMM's rows are the weight's N, its columns the activation's M
  qlp::GemmArgs args{w.data_ptr(), x.data_ptr(), out.data_ptr(), nullptr, nullptr, bias_ptr, int(n), int(m),
                     int(k), false, false, 0, int(x.get_device()), sm_count(x.get_device()), scale.data_ptr(),
                     zero.data_ptr(), int(group_size)};
  launch(args, x, dt == at::kHalf, config);
  return out;
}

#else
// out[M, N] = the family's scaled product of a[M, K] and b[N, K], plus bias[N], with tile
// configuration `config` (an index into configs()); returns out.
torch::Tensor gemm(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& scale_a,
                   const torch::Tensor& scale_b, const c10::optional<torch::Tensor>& bias, torch::Tensor out,
                   int64_t config) {
  check_matrix(a, "a", kOperand, a);
  check_matrix(b, "b", kOperand, a);
  QLP_CHECK(out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kHalf, "qlinear_pass cutlass ",
              kFamily, ": out must be bfloat16 or float16, got ", out.scalar_type());
  check_matrix(out, "out", out.scalar_type(), a);
  const int64_t m = a.size(0), k = a.size(1), n = b.size(0);
  QLP_CHECK(b.size(1) == k, "qlinear_pass cutlass ", kFamily, ": a is ", a.sizes(), " but b is ", b.sizes());
  QLP_CHECK(out.size(0) == m && out.size(1) == n, "qlinear_pass cutlass ", kFamily, ": out is ", out.sizes(),
              ", expected [", m, ", ", n, "]");
  QLP_CHECK(k % 16 == 0 && n % 8 == 0, "qlinear_pass cutlass ", kFamily,
              ": needs K % 16 == 0 and N % 8 == 0, got N=", n, " K=", k);
  QLP_CHECK(m < (int64_t(1) << 31) && n < (int64_t(1) << 31) && k < (int64_t(1) << 31),
              "qlinear_pass cutlass: sizes must fit in int32");
  check_config(config);
  bool a_rows = false, b_cols = false;
  int64_t a_ld = 0;
  if (kBlock) {
    QLP_CHECK(k % 128 == 0, "qlinear_pass cutlass fp8_block: needs K % 128 == 0 (whole scale blocks), got K=", k);
    // MN-major activation scales: [K/128, ld] with ld >= M a multiple of 4 (16-byte TMA rows)
    QLP_CHECK(scale_a.dim() == 2 && scale_a.size(0) == k / 128 && scale_a.size(1) >= m &&
                    scale_a.size(1) % 4 == 0,
                "qlinear_pass cutlass fp8_block: scale_a must be the MN-major activation scales, [K/128, M rounded "
                "up to a multiple of 4] = [", k / 128, ", ", (m + 3) / 4 * 4, "], got ", scale_a.sizes());
    a_ld = scale_a.size(1);
    check_scale(scale_a, "scale_a", scale_a.numel(), a);
    QLP_CHECK(reinterpret_cast<uintptr_t>(scale_a.data_ptr()) % 16 == 0,
                "qlinear_pass cutlass fp8_block: scale_a must start on a 16-byte boundary (TMA)");
    check_scale(scale_b, "scale_b", cdiv(n, 128) * cdiv(k, 128), a);
  } else {
    a_rows = scale_a.numel() != 1;
    b_cols = scale_b.numel() != 1;
    check_scale(scale_a, "scale_a", a_rows ? m : 1, a);
    check_scale(scale_b, "scale_b", b_cols ? n : 1, a);
  }
  const void* bias_ptr = bias_pointer(bias, out, n);
  if (m == 0) return out;
  qlp::GemmArgs args{a.data_ptr(), b.data_ptr(), out.data_ptr(), scale_a.data_ptr<float>(),
                     scale_b.data_ptr<float>(), bias_ptr, int(m), int(n), int(k), a_rows, b_cols,
                     int(a_ld), int(a.get_device()), sm_count(a.get_device())};
  launch(args, a, out.scalar_type() == at::kHalf, config);
  return out;
}

#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "qlinear_pass CUTLASS sm90a GEMMs (one kernel family)";
  module.attr("family") = kFamily;
#if defined(QLP_WEIGHT_ONLY_8BIT)
  module.def("gemm", &wo8_gemm, "out = (x @ w.T) * scale + bias (see qlp_gemm.cuh)", pybind11::arg("x"),
             pybind11::arg("w"), pybind11::arg("scale"), pybind11::arg("bias"), pybind11::arg("out"),
             pybind11::arg("config"));
#elif defined(QLP_FAMILY_W4A16)
  module.def("gemm", &w4a16_gemm, "out = x @ dequant(w).T + bias (see qlp_gemm.cuh)", pybind11::arg("x"),
             pybind11::arg("w"), pybind11::arg("scale"), pybind11::arg("zero"), pybind11::arg("group_size"),
             pybind11::arg("bias"), pybind11::arg("out"), pybind11::arg("config"));
#else
  module.def("gemm", &gemm, "out = scaled a @ b.T + bias (see qlp_gemm.cuh)", pybind11::arg("a"),
             pybind11::arg("b"), pybind11::arg("scale_a"), pybind11::arg("scale_b"), pybind11::arg("bias"),
             pybind11::arg("out"), pybind11::arg("config"));
#endif
  module.def("configs", &configs, "the family's tile configurations, by index");
}
