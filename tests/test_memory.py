"""Huge-page CPU buffers and their cache (clinkd_kernels/_memory.py, csrc/memory/cpu_buffers.cpp): what the
buffers are, how long they live, when they are reused, when they fall back to torch.empty."""

from __future__ import annotations

import gc

import pytest
import torch

from clinkd_kernels import _dispatch, _memory, cpu_cache_bytes, empty_cpu_cache
from clinkd_kernels._memory import MIN_BYTES, empty_huge_pages, empty_output, huge_pages_available
from clinkd_kernels.loss import linear_kd_loss


def _mapping_of(ptr: int) -> dict | None:
    """The /proc/self/smaps entry (its range and VmFlags) holding address ``ptr``, or None."""
    entry = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                entry = {"range": (lo, hi)} if lo <= ptr < hi else None
            elif entry is not None and line.startswith("VmFlags:"):
                entry["flags"] = line.split()[1:]
                return entry
    return None


CPU = torch.device("cpu")
needs_thp = pytest.mark.skipif(not huge_pages_available(), reason="no transparent huge pages on this machine")
needs_extension = pytest.mark.skipif(_dispatch.extension() is None, reason="the C++ extension is not built")


@pytest.fixture(autouse=True)
def _empty_cache():
    empty_cpu_cache()
    yield
    gc.collect()
    empty_cpu_cache()


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_large_buffer_is_a_plain_writable_tensor(dtype, cached):
    shape = (3, MIN_BYTES // 3 // torch.empty(0, dtype=dtype).element_size() + 7)  # ragged, above the threshold
    x = empty_huge_pages(shape, dtype=dtype, cached=cached)
    assert x.shape == shape and x.dtype == dtype and x.is_contiguous() and x.device.type == "cpu"
    values = torch.randn(shape, dtype=torch.float64).to(dtype)
    x.copy_(values)
    x[1:].mul_(2)
    torch.testing.assert_close(x[0], values[0], rtol=0, atol=0)
    torch.testing.assert_close(x[1:], values[1:] * 2, rtol=0, atol=0)


@needs_thp
@pytest.mark.parametrize("cached", [False, True])
def test_large_buffer_asks_for_huge_pages_and_lives_as_long_as_its_views(cached):
    x = empty_huge_pages((MIN_BYTES // 4,), dtype=torch.float32, cached=cached)
    x.fill_(1.0)
    view = x[10:20]
    entry = _mapping_of(x.data_ptr())
    assert entry is not None and "hg" in entry["flags"], entry  # madvise(MADV_HUGEPAGE) applied
    del x
    gc.collect()
    assert _mapping_of(view.data_ptr()) is not None and (view == 1).all()  # a view keeps the buffer
    assert cpu_cache_bytes() == 0  # still in use: not offered for reuse
    lo = entry["range"][0]
    del view
    gc.collect()
    if cached:  # kept mapped for the next request of its size, then unmapped by empty_cpu_cache
        assert cpu_cache_bytes() >= MIN_BYTES and _mapping_of(lo) is not None
        assert empty_cpu_cache() >= MIN_BYTES and cpu_cache_bytes() == 0
    after = _mapping_of(lo)
    assert after is None or "hg" not in after.get("flags", []), "the mapping outlived its tensors"


@needs_thp
@needs_extension
def test_cached_buffer_is_reused_only_when_dead_and_only_for_its_size():
    a = empty_huge_pages((MIN_BYTES // 4,), dtype=torch.float32, cached=True)
    ptr = a.data_ptr()
    b = empty_huge_pages((MIN_BYTES // 4,), dtype=torch.float32, cached=True)
    assert b.data_ptr() != ptr  # a is alive: never handed out twice
    a.fill_(3.0)
    del a
    gc.collect()
    other = empty_huge_pages((2 * MIN_BYTES // 4,), dtype=torch.float32, cached=True)
    assert other.data_ptr() != ptr  # another size does not take it
    uncached = empty_huge_pages((MIN_BYTES // 4,), dtype=torch.float32)
    assert uncached.data_ptr() != ptr  # an uncached request does not take it
    again = empty_huge_pages((MIN_BYTES // 8, 2), dtype=torch.float32, cached=True)  # same bytes, new shape
    assert again.data_ptr() == ptr and again.shape == (MIN_BYTES // 8, 2)
    del b, other, uncached, again


def test_small_buffer_and_no_thp_fall_back_to_torch_empty(monkeypatch):
    small = empty_huge_pages((16, 16), dtype=torch.float32, cached=True)
    assert small.untyped_storage().resizable()  # torch's allocator, not a mapping
    monkeypatch.setattr(_memory, "huge_pages_available", lambda: False)
    big = empty_huge_pages((MIN_BYTES // 4,), dtype=torch.float32, cached=True)
    assert big.untyped_storage().resizable() and big.numel() == MIN_BYTES // 4


def test_without_the_extension_buffers_come_from_torch_empty(monkeypatch):
    monkeypatch.setattr(_memory, "extension", lambda: None)
    x = empty_huge_pages((MIN_BYTES // 4,), dtype=torch.float32, cached=True)
    assert x.untyped_storage().resizable()  # torch's allocator
    x.fill_(2.0)
    assert float(x.sum()) == 2.0 * (MIN_BYTES // 4)
    assert cpu_cache_bytes() == 0 and empty_cpu_cache() == 0


def test_poisoned_outputs(monkeypatch):
    monkeypatch.setenv("CLINKD_POISON", "1")
    assert torch.isnan(empty_output((3, 4), dtype=torch.float16, device=CPU)).all()
    assert (empty_output((5,), dtype=torch.int32, device=CPU) == -1).all()
    huge = empty_output((MIN_BYTES // 2,), dtype=torch.float16, device=CPU, cached=True)
    assert torch.isnan(huge).all()


@needs_thp
@needs_extension
def test_linear_kd_loss_weight_grad_is_cached_and_accumulates():
    """grad_W of a large lm_head comes from the cache; dropping it (zero_grad) and calling again reuses the
    buffer with correct values, and autograd can keep accumulating into it."""
    vocab, hd = 8192, 256  # 8 MiB of fp32 gradient
    hidden = torch.randn(40, hd, requires_grad=True)
    weight = (torch.randn(vocab, hd) * hd**-0.5).requires_grad_()
    labels = torch.randint(0, vocab, (40,))
    labels[::7] = -100
    linear_kd_loss(hidden, weight, labels, alpha=0.0, backend="cpu").backward()
    entry = _mapping_of(weight.grad.data_ptr())
    assert entry is not None and "hg" in entry["flags"]
    first, ptr = weight.grad.clone(), weight.grad.data_ptr()
    weight.grad = None
    gc.collect()
    linear_kd_loss(hidden, weight, labels, alpha=0.0, backend="cpu").backward()
    assert weight.grad.data_ptr() == ptr  # the same buffer, written afresh
    torch.testing.assert_close(weight.grad, first, rtol=0, atol=0)
    linear_kd_loss(hidden, weight, labels, alpha=0.0, backend="cpu").backward()
    torch.testing.assert_close(weight.grad, 2 * first)


@needs_extension
def test_bad_sizes_are_refused_in_cpp():
    with pytest.raises(ValueError, match="sizes must be >= 0"):
        _dispatch.extension().cpu_buffer_empty([-1, 3], torch.float32, True)


def _run_with_cache_setting(value: str, code: str):
    import os
    import subprocess
    import sys

    env = dict(os.environ, CLINKD_CPU_CACHE_MB=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@needs_thp
@needs_extension
def test_cache_cap_from_the_environment():
    code = (
        "import gc, torch; from clinkd_kernels._memory import empty_huge_pages, cpu_cache_bytes, MIN_BYTES\n"
        "x = empty_huge_pages((MIN_BYTES // 4,), dtype=torch.float32, cached=True); x.fill_(1); del x; gc.collect()\n"
        "print(cpu_cache_bytes())"
    )
    off = _run_with_cache_setting("0", code)
    assert off.returncode == 0, off.stderr
    assert off.stdout.split()[-1] == "0"  # nothing kept
    on = _run_with_cache_setting("64", code)
    assert on.returncode == 0 and int(on.stdout.split()[-1]) >= MIN_BYTES, on.stderr
    bad = _run_with_cache_setting("lots", code)
    assert bad.returncode != 0 and "CLINKD_CPU_CACHE_MB must be a whole number of MiB" in bad.stderr
