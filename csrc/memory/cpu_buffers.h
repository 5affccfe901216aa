// Large CPU buffers on 2 MiB pages, cached for reuse: the CPU counterpart of PyTorch's CUDA caching
// allocator, for the few vocabulary-sized buffers of the lm_head loss (clinkd_kernels/_memory.py).
//
// A buffer is an anonymous private mapping advised MADV_HUGEPAGE. A `cached` buffer's mapping is not
// unmapped when its tensor's storage dies but kept, still resident, for the next cached request of the
// same byte size, up to a cap on the bytes kept (CLINKD_CPU_CACHE_MB, default 4096; 0 turns caching
// off). That request then touches no fresh page: no page fault, no kernel zeroing.
#pragma once

#include <ATen/ATen.h>

namespace clinkd {

// An uninitialised contiguous CPU tensor of `sizes` and `dtype` (storage not resizable).
at::Tensor cpu_buffer_empty(at::IntArrayRef sizes, at::ScalarType dtype, bool cached);

// Unmaps every cached buffer not in use; returns the bytes released.
int64_t cpu_buffer_cache_clear();

// Bytes held by cached buffers not in use.
int64_t cpu_buffer_cache_bytes();

}  // namespace clinkd
