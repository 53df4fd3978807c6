// Registers the CUDA implementation of the fused prototype-distance op:
//   torch.ops.protokern_C.forward(z, p, eps, precision) -> (similarity, min_distances, patch_index)
//   torch.ops.protokern_C.backward(grad_similarity, grad_min_distances, z, p, patch_index,
//                                  min_distances, eps) -> (grad_z, grad_p)
// Contracts: docs/design.md. Kernels: forward.cuh, backward.cuh (launchers forward.cu, backward.cu).
// Fake (meta) implementations: protokern/_cuda.py.

#include <Python.h>  // the module's init function only: no pybind11, no torch/extension.h (a long compile)

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // = at::cuda::getCurrentCUDAStream, without cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <tuple>

#include "params.h"

namespace protokern {
namespace {

constexpr int64_t kMaxInt = std::numeric_limits<int>::max();

// Error messages are assembled from strings only: every number is formatted here (std::to_string,
// snprintf), never streamed by TORCH_CHECK. On the H200 image the checks whose messages streamed
// numbers (t.sizes(), an int64_t) crashed the process while string-only ones raised cleanly; that
// this was the cause is a hypothesis until tests/test_cuda_backend.py's child-process check passes.
std::string num(int64_t v) { return std::to_string(v); }

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// z (B, D, HW) with its channels innermost (stride_d = 1): z itself if they already are, else a copy.
at::Tensor channels_innermost(const at::Tensor& z) {
  return z.stride(1) == 1 ? z : z.transpose(1, 2).contiguous().transpose(1, 2);
}

// The forward's z rows (params.h ForwardParams::zr), (B, HW, D): z's own (B, HW, D) view where its channels
// are innermost, 16-byte aligned, with image and patch strides multiples of 4; else a copy into rows padded to
// a multiple of 4 channels (the padding is never read).
at::Tensor channel_rows(const at::Tensor& z) {
  const at::Tensor t = z.transpose(1, 2);
  if (t.stride(2) == 1 && t.stride(0) % 4 == 0 && t.stride(1) % 4 == 0 &&
      reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0)
    return t;
  const int64_t D = z.size(1);
  at::Tensor rows = at::empty({z.size(0), z.size(2), (D + 3) / 4 * 4}, z.options());
  rows.narrow(2, 0, D).copy_(t);
  return rows;
}

// "(2, 8, 5)"
std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + num(t.size(i));
  return s + ")";
}

void check_tensor(const at::Tensor& t, const char* op, const char* name, int64_t dim,
                  at::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda(), "protokern_C::", op, ": ", name, " must be a CUDA tensor, got device ",
              t.device().str());
  TORCH_CHECK(t.scalar_type() == dtype, "protokern_C::", op, ": ", name, " must be ",
              std::string(c10::toString(dtype)), ", got ", std::string(c10::toString(t.scalar_type())));
  TORCH_CHECK(t.dim() == dim, "protokern_C::", op, ": ", name, " must have ", num(dim),
              " dimensions, got shape ", shape_str(t));
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                       const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "protokern_C::", op, ": ", name, " is on ",
              t.device().str(), " but z is on ", ref.device().str());
}

void check_bm(const at::Tensor& t, int64_t B, int64_t M, const char* op, const char* name) {
  TORCH_CHECK(t.size(0) == B && t.size(1) == M, "protokern_C::", op, ": ", name,
              " must have shape (B, M) = (", num(B), ", ", num(M), "), got ", shape_str(t));
}

void check_sizes(int64_t B, int64_t D, int64_t HW, int64_t M, const char* op) {
  TORCH_CHECK(D > 0 && HW > 0, "protokern_C::", op,
              ": z must have at least one channel and one patch, got (D, HW) = (", num(D), ", ",
              num(HW), ")");
  TORCH_CHECK(B <= kMaxInt, "protokern_C::", op, ": batch size too large for 32-bit indexing, got ", num(B));
  TORCH_CHECK(D * HW <= kMaxInt && M * D <= kMaxInt && M <= kMaxInt, "protokern_C::", op,
              ": sizes too large for 32-bit indexing (D=", num(D), ", HW=", num(HW), ", M=", num(M),
              ")");
}

// eps of log((d + 1) / (d + eps)): > 0, finite, and the similarity at d = 0 finite in float32 (as
// the kernel computes it: log1p((1 - eps) / (d + eps))).
void check_eps(double eps, const char* op) {
  TORCH_CHECK(eps > 0, "protokern_C::", op, ": eps must be > 0, got ", num(eps));
  const float e = static_cast<float>(eps);
  TORCH_CHECK(std::isfinite(eps) && e > 0 && std::isfinite(std::log1p((1.f - e) / e)), "protokern_C::", op,
              ": eps must be finite and give a finite similarity log((0 + 1) / (0 + eps)) in float32, got ",
              num(eps));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& z,
                                                            const at::Tensor& p, double eps,
                                                            c10::string_view precision) {
  check_tensor(z, "forward", "z", 3, at::kFloat);
  check_tensor(p, "forward", "p", 2, at::kFloat);
  check_same_device(p, z, "forward", "p");
  TORCH_CHECK(p.size(1) == z.size(1), "protokern_C::forward: channel mismatch: z is (B, D, HW) = ",
              shape_str(z), " but p is (M, D) = ", shape_str(p));
  check_eps(eps, "forward");
  TORCH_CHECK(precision == "highest" || precision == "high" || precision == "medium",
              "protokern_C::forward: precision must be 'highest', 'high' or 'medium', got '",
              std::string(precision), "'");
  const int64_t B = z.size(0), D = z.size(1), HW = z.size(2), M = p.size(0);
  check_sizes(B, D, HW, M, "forward");

  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor pc = p.contiguous();
  at::Tensor similarity = at::empty({B, M}, z.options());
  at::Tensor min_distances = at::empty({B, M}, z.options());
  at::Tensor patch_index = at::empty({B, M}, z.options().dtype(at::kLong));
  if (B == 0 || M == 0) return {similarity, min_distances, patch_index};

  ForwardParams prm{};
  prm.z = z.data_ptr<float>();
  prm.z_sb = z.stride(0);
  prm.z_sd = z.stride(1);
  prm.z_sk = z.stride(2);
  prm.p = pc.data_ptr<float>();
  prm.similarity = similarity.data_ptr<float>();
  prm.min_distances = min_distances.data_ptr<float>();
  prm.patch_index = patch_index.data_ptr<int64_t>();
  prm.B = static_cast<int>(B);
  prm.D = static_cast<int>(D);
  prm.HW = static_cast<int>(HW);
  prm.M = static_cast<int>(M);
  prm.eps = static_cast<float>(eps);
  prm.precision = precision == "high" ? kSearch3xTf32 : precision == "medium" ? kSearchTf32 : kSearchFp32;
  at::Tensor rows;  // the rescoring's z rows (params.h), kept alive until the launch
  if (forward_needs_rows(prm)) {
    rows = channel_rows(z);
    prm.zr = rows.data_ptr<float>();
    prm.zr_sb = rows.stride(0);
    prm.zr_sk = rows.stride(1);
  }
  launch_forward(prm, c10::cuda::getCurrentCUDAStream());
  return {similarity, min_distances, patch_index};
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_similarity,
                                                 const at::Tensor& grad_min_distances,
                                                 const at::Tensor& z, const at::Tensor& p,
                                                 const at::Tensor& patch_index,
                                                 const at::Tensor& min_distances, double eps) {
  check_tensor(z, "backward", "z", 3, at::kFloat);
  check_tensor(p, "backward", "p", 2, at::kFloat);
  check_tensor(grad_similarity, "backward", "grad_similarity", 2, at::kFloat);
  check_tensor(grad_min_distances, "backward", "grad_min_distances", 2, at::kFloat);
  check_tensor(patch_index, "backward", "patch_index", 2, at::kLong);
  check_tensor(min_distances, "backward", "min_distances", 2, at::kFloat);
  check_same_device(p, z, "backward", "p");
  check_same_device(grad_similarity, z, "backward", "grad_similarity");
  check_same_device(grad_min_distances, z, "backward", "grad_min_distances");
  check_same_device(patch_index, z, "backward", "patch_index");
  check_same_device(min_distances, z, "backward", "min_distances");
  TORCH_CHECK(p.size(1) == z.size(1),
              "protokern_C::backward: channel mismatch: z is (B, D, HW) = ", shape_str(z),
              " but p is (M, D) = ", shape_str(p));
  check_eps(eps, "backward");
  const int64_t B = z.size(0), D = z.size(1), HW = z.size(2), M = p.size(0);
  check_sizes(B, D, HW, M, "backward");
  check_bm(grad_similarity, B, M, "backward", "grad_similarity");
  check_bm(grad_min_distances, B, M, "backward", "grad_min_distances");
  check_bm(patch_index, B, M, "backward", "patch_index");
  check_bm(min_distances, B, M, "backward", "min_distances");

  const c10::cuda::CUDAGuard guard(z.device());
  if (B == 0 || M == 0) return {at::zeros({B, D, HW}, z.options()), at::zeros({M, D}, p.options())};

  const at::Tensor pc = p.contiguous();
  const at::Tensor gs = grad_similarity.contiguous();
  const at::Tensor gm = grad_min_distances.contiguous();
  const at::Tensor idx = patch_index.contiguous();
  const at::Tensor md = min_distances.contiguous();
  at::Tensor grad_z = at::empty({B, D, HW}, z.options());
  at::Tensor grad_p = at::empty({M, D}, p.options());

  // z is read with its own strides (backward.cuh stages it), except where grad_p gathers it (params.h).
  const at::Tensor zg = HW > kBackwardStagedPatches ? channels_innermost(z) : z;
  BackwardParams prm{};
  prm.grad_similarity = gs.data_ptr<float>();
  prm.grad_min_distances = gm.data_ptr<float>();
  prm.z = zg.data_ptr<float>();
  prm.z_sb = zg.stride(0);
  prm.z_sd = zg.stride(1);
  prm.z_sk = zg.stride(2);
  prm.p = pc.data_ptr<float>();
  prm.patch_index = idx.data_ptr<int64_t>();
  prm.min_distances = md.data_ptr<float>();
  prm.grad_z = grad_z.data_ptr<float>();
  prm.grad_p = grad_p.data_ptr<float>();
  prm.B = static_cast<int>(B);
  prm.D = static_cast<int>(D);
  prm.HW = static_cast<int>(HW);
  prm.M = static_cast<int>(M);
  prm.eps = static_cast<float>(eps);
  prm.gp_max_parts = backward_max_parts_from_env();  // read once: the workspace and the launch agree
  // grad_p's image parts (backward.cuh): their partial sums and a zeroed counter per tile, where it has parts.
  const BackwardWorkspace ws = backward_workspace(prm);
  at::Tensor partial, count;
  if (ws.partial_floats > 0) {
    partial = at::empty({ws.partial_floats}, z.options());
    count = at::zeros({ws.counters}, z.options().dtype(at::kInt));
    prm.gp_partial = partial.data_ptr<float>();
    prm.gp_count = reinterpret_cast<unsigned*>(count.data_ptr<int>());
  }
  launch_backward(prm, c10::cuda::getCurrentCUDAStream());
  return {grad_z, grad_p};
}

}  // namespace
}  // namespace protokern

TORCH_LIBRARY(protokern_C, m) {
  m.def("forward(Tensor z, Tensor p, float eps, str precision) -> (Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor grad_similarity, Tensor grad_min_distances, Tensor z, Tensor p, "
      "Tensor patch_index, Tensor min_distances, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(protokern_C, CUDA, m) {
  m.impl("forward", &protokern::forward_cuda);
  m.impl("backward", &protokern::backward_cuda);
}

// `import protokern._C` loads this library, which runs the registrations above; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {  // the module name setup.py gives the extension
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "protokern CUDA kernels; the ops live in torch.ops.protokern_C", -1, nullptr};
  return PyModule_Create(&module);
}
