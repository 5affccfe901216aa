// CPU buffer cache (cpu_buffers.h). Why: at Qwen's vocabulary the lm_head weight gradient is a fresh
// [151936, 1536] fp32 buffer (0.9 GiB) every step; its first touch on 4 KiB pages cost ~0.3 s of a ~2 s
// loss step on a 2-core VM (230 000 faults, each zeroing a page), and about half of that on 2 MiB pages,
// because the zeroing evicts the matmul's cache-blocked panels. A cached buffer is touched already.
#include "cpu_buffers.h"

#include <cstdlib>
#include <map>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace clinkd {
namespace {

constexpr size_t kPage = size_t(2) << 20;  // sizes round up to whole 2 MiB pages

struct Cache {
  std::mutex mu;
  std::multimap<size_t, void*> idle;  // byte size → mapping not in use
  size_t idle_bytes = 0;
};

// Never destroyed: a tensor's deleter may run during static destruction at exit.
Cache& cache() {
  static Cache* c = new Cache();
  return *c;
}

size_t cache_cap_bytes() {
  static const size_t cap = [] {
    const char* env = std::getenv("CLINKD_CPU_CACHE_MB");
    if (env == nullptr || *env == '\0') return size_t(4096) << 20;
    char* end = nullptr;
    const long long mb = std::strtoll(env, &end, 10);
    TORCH_CHECK_VALUE(end != env && *end == '\0' && mb >= 0, "CLINKD_CPU_CACHE_MB must be a whole number of MiB >= 0, got '",
                      env, "'");
    return static_cast<size_t>(mb) << 20;
  }();
  return cap;
}

#if defined(__linux__)
void* map_region(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "out of memory: could not map ", bytes, " bytes for a CPU buffer");
  madvise(p, bytes, MADV_HUGEPAGE);  // advice only: refused (THP off) it is still a valid mapping
  return p;
}

void release(void* p, size_t bytes, bool cached) {
  Cache& c = cache();
  if (cached) {
    std::lock_guard<std::mutex> lock(c.mu);
    if (c.idle_bytes + bytes <= cache_cap_bytes()) {
      c.idle.emplace(bytes, p);
      c.idle_bytes += bytes;
      return;
    }
  }
  munmap(p, bytes);
}
#endif

}  // namespace

at::Tensor cpu_buffer_empty(at::IntArrayRef sizes, at::ScalarType dtype, bool cached) {
  int64_t numel = 1;
  for (const int64_t s : sizes) {
    TORCH_CHECK_VALUE(s >= 0, "cpu_buffer_empty: sizes must be >= 0, got ", sizes);
    numel *= s;
  }
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
#if defined(__linux__)
  const size_t used = static_cast<size_t>(numel) * c10::elementSize(dtype);
  if (used == 0) return at::empty(sizes, options);
  const size_t bytes = (used + kPage - 1) / kPage * kPage;
  void* p = nullptr;
  if (cached) {
    cache_cap_bytes();  // a bad CLINKD_CPU_CACHE_MB raises here, never in the deleter (which must not throw)
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    auto it = c.idle.find(bytes);
    if (it != c.idle.end()) {
      p = it->second;
      c.idle.erase(it);
      c.idle_bytes -= bytes;
    }
  }
  if (p == nullptr) p = map_region(bytes);
  return at::from_blob(p, sizes, [bytes, cached](void* q) { release(q, bytes, cached); }, options);
#else
  return at::empty(sizes, options);
#endif
}

int64_t cpu_buffer_cache_clear() {
#if defined(__linux__)
  std::multimap<size_t, void*> idle;
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    idle.swap(c.idle);
    c.idle_bytes = 0;
  }
  int64_t released = 0;
  for (const auto& [bytes, p] : idle) {
    munmap(p, bytes);
    released += static_cast<int64_t>(bytes);
  }
  return released;
#else
  return 0;
#endif
}

int64_t cpu_buffer_cache_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return static_cast<int64_t>(c.idle_bytes);
}

}  // namespace clinkd
