// Registers the C++/CUDA ops with the torch dispatcher (namespace "clinkd") and defines the
// Python module clinkd_kernels._C, whose import is what loads them.
#include <torch/extension.h>
#include <torch/library.h>

#include "loss/kd_rows.h"
#include "memory/cpu_buffers.h"
#include "rope/mrope_rotate.h"
#include "topk/topk.h"

TORCH_LIBRARY_FRAGMENT(clinkd, m) {
  m.def(
      "topk_pseudo_labels_ext(Tensor logits, int k, float temperature) -> "
      "(Tensor indices, Tensor logprobs, Tensor lse, Tensor margin, Tensor residual)");
  m.def(
      "kd_rows_ext(Tensor z, Tensor labels, Tensor? teacher_logits, Tensor? topk_indices, Tensor? topk_logprobs, "
      "Tensor? topk_residual, float inv_temperature, int ignore_index, Tensor coef_kd, Tensor coef_ce, "
      "Tensor(a!) kd_out, Tensor(b!) ce_out, Tensor(c!)? grad_out) -> ()");
  m.def(
      "mrope_rotate_ext(Tensor q, Tensor k, Tensor(a!) q_out, Tensor(b!) k_out, Tensor position_ids, "
      "Tensor inv_freq, Tensor axis, float scale, bool inverse) -> ()");
}

TORCH_LIBRARY_IMPL(clinkd, CPU, m) {
  m.impl("topk_pseudo_labels_ext", &clinkd::topk_pseudo_labels_cpu);
  m.impl("kd_rows_ext", &clinkd::kd_rows_cpu);
  m.impl("mrope_rotate_ext", &clinkd::mrope_rotate_cpu);
}

#ifdef CLINKD_WITH_CUDA
TORCH_LIBRARY_IMPL(clinkd, CUDA, m) { m.impl("topk_pseudo_labels_ext", &clinkd::topk_pseudo_labels_cuda); }
#endif

PYBIND11_MODULE(_C, module) {
  module.doc() = "clinkd C++/CUDA kernels (ops are registered under torch.ops.clinkd)";
  module.def("cpu_buffer_empty", &clinkd::cpu_buffer_empty, "A CPU tensor on 2 MiB pages (cached: its mapping is kept for reuse).",
             pybind11::arg("sizes"), pybind11::arg("dtype"), pybind11::arg("cached"));
  module.def("cpu_buffer_cache_clear", &clinkd::cpu_buffer_cache_clear,
             "Unmaps the cached CPU buffers not in use; returns the bytes released.");
  module.def("cpu_buffer_cache_bytes", &clinkd::cpu_buffer_cache_bytes, "Bytes held by cached CPU buffers not in use.");
  module.def("has_cuda", [] {
#ifdef CLINKD_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled into this build.");
  module.def("cuda_archs", [] {
#ifdef CLINKD_WITH_CUDA
    return std::string(CLINKD_CUDA_ARCHS);
#else
    return std::string();
#endif
  }, "The compute capabilities the CUDA kernels were compiled for (';'-separated).");
}
