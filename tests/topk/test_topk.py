"""topk_pseudo_labels against its float64 reference, under the test rule of tests/numerics.py."""

import math

import pytest
import torch

from clinkd_kernels import _dispatch
from clinkd_kernels.topk import topk_pseudo_labels, topk_pseudo_labels_reference
from tests.numerics import assert_close

needs_ext = pytest.mark.skipif(_dispatch.extension() is None, reason="clinkd_kernels._C is not built")
CPU_BACKENDS = [pytest.param("cpu", marks=needs_ext), "torch"]

# Output values are fp32 of magnitude up to ~|max logit| + log V ≈ 20, where one fp32 ulp is ~2e-6.
ATOL = 1e-5


def check_against_reference(logits, k, temperature, backend):
    got = topk_pseudo_labels(logits, k, temperature=temperature, backend=backend)
    ref = topk_pseudo_labels_reference(logits, k, temperature=temperature, compute_dtype=torch.float64)
    base = topk_pseudo_labels_reference(logits, k, temperature=temperature, compute_dtype=torch.float32)
    assert got.indices.dtype == torch.int32 and got.indices.shape == (logits.shape[0], k)
    for name in ("logprobs", "lse", "margin", "residual"):
        assert getattr(got, name).dtype == torch.float32, name
    torch.testing.assert_close(got.indices.cpu(), ref.indices, rtol=0, atol=0, msg="indices differ")
    # All four are differences (y - lse, p1 - p2, 1 - sum p) whose fp32 error is absolute (~1e-6) and
    # whose values may be ~0, so the norm test is taken on the unit scale, not relative to the values.
    for name in ("logprobs", "lse", "margin", "residual"):
        value = getattr(got, name)
        assert_close(
            name,
            value,
            getattr(ref, name),
            getattr(base, name),
            atol=ATOL,
            dtype=torch.float32,
            norm_floor=math.sqrt(value.numel()),
        )
    return got, ref


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "n,v,k", [(7, 1000, 1), (33, 4099, 64), (5, 1025, 2), (3, 151, 151), (1, 1, 1), (2, 2, 1), (9, 2053, 1024)]
)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0, 0.7])
def test_matches_reference(backend, dtype, n, v, k, temperature):
    logits = (torch.randn(n, v) * 4).to(dtype)
    check_against_reference(logits, k, temperature, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties_take_lower_index(backend):
    # Few distinct values: nearly every top-k slot is decided by the tie rule.
    logits = torch.randint(-3, 4, (16, 3001)).float()
    got, _ = check_against_reference(logits, 50, 1.0, backend)
    top_value = logits.max(-1).values
    first_ids = [(row == m).nonzero()[:50].flatten() for row, m in zip(logits, top_value)]
    for row, ids in zip(got.indices, first_ids):
        torch.testing.assert_close(row[: len(ids)].long(), ids)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_negative_infinity_entries(backend):
    # Masked vocabulary: most entries -inf, fewer finite entries than k in some rows.
    logits = torch.randn(6, 700)
    logits[torch.rand(6, 700) < 0.97] = float("-inf")
    logits[0, :] = float("-inf")
    logits[0, 699] = 2.0  # one finite entry: k - 1 of the top-k are -inf, taken by lowest id
    got, _ = check_against_reference(logits, 40, 1.0, backend)
    assert got.indices[0, 0].item() == 699
    assert got.indices[0, 1:].tolist() == list(range(39))
    assert got.logprobs[0, 0].item() == 0.0 and got.margin[0].item() == 1.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_positive_infinity_takes_the_mass(backend):
    logits = torch.randn(4, 513)
    logits[0, 77] = float("inf")
    logits[1, 5] = logits[1, 400] = float("inf")
    logits[2, 300] = float("inf")
    logits[2, :10] = float("-inf")
    got, ref = check_against_reference(logits, 3, 1.0, backend)
    assert got.indices[0, 0] == 77 and got.logprobs[0, 0] == 0.0 and got.margin[0] == 1.0
    assert got.indices[1, :2].tolist() == [5, 400]
    assert got.logprobs[1, 0].item() == pytest.approx(-math.log(2)) and got.margin[1] == 0.0
    assert torch.isposinf(got.lse[:3]).all() and got.residual[:3].eq(0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_rows_and_non_contiguous_vocab(backend):
    big = torch.randn(9, 3000)
    rows = big[:, 7:2007]  # row stride 3000, unit vocab stride: read in place
    check_against_reference(rows, 16, 1.0, backend)
    transposed = torch.randn(1500, 11).t()  # vocab stride 11: copied once
    check_against_reference(transposed, 16, 1.0, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    got = topk_pseudo_labels(torch.randn(0, 50), 4, backend=backend)
    assert got.indices.shape == (0, 4) and got.indices.dtype == torch.int32
    assert got.logprobs.shape == (0, 4) and got.lse.shape == (0,) and got.residual.shape == (0,)


def test_large_vocabulary_row():
    """The Qwen2 vocabulary, a few rows: long online log-sum-exp and many heap updates."""
    logits = torch.randn(3, 151936) * 3
    check_against_reference(logits, 64, 1.0, "cpu" if _dispatch.extension() is not None else "torch")


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "logits,k,temperature,error,match",
    [
        (torch.randn(4, 10), 0, 1.0, ValueError, "k must be in"),
        (torch.randn(4, 10), -3, 1.0, ValueError, "k must be in"),
        (torch.randn(4, 10), 11, 1.0, ValueError, "k must be in"),
        (torch.randn(2, 3000), 1025, 1.0, ValueError, "k must be in"),
        (torch.randn(4, 10), 2.0, 1.0, TypeError, "k must be an int"),
        (torch.randn(10), 2, 1.0, ValueError, "logits must be 2-D"),
        (torch.randn(2, 3, 10), 2, 1.0, ValueError, "logits must be 2-D"),
        (torch.randint(0, 5, (4, 10)), 2, 1.0, TypeError, "logits must have dtype"),
        (torch.randn(4, 10).double(), 2, 1.0, TypeError, "logits must have dtype"),
        (torch.randn(4, 10), 2, 0.0, ValueError, "temperature"),
        (torch.randn(4, 10), 2, -1.0, ValueError, "temperature"),
        (torch.randn(4, 10), 2, float("nan"), ValueError, "temperature"),
        (torch.randn(4, 10), 2, float("inf"), ValueError, "temperature"),
        ([[1.0, 2.0]], 1, 1.0, TypeError, "logits must be a torch.Tensor"),
    ],
)
def test_bad_arguments(backend, logits, k, temperature, error, match):
    with pytest.raises(error, match=match):
        topk_pseudo_labels(logits, k, temperature=temperature, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_rows_are_named(backend):
    logits = torch.randn(12, 300)
    logits[3, 17] = float("nan")
    logits[8, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN: rows 3, 8"):
        topk_pseudo_labels(logits, 5, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_negative_infinity_row_is_an_error(backend):
    logits = torch.randn(5, 300)
    logits[2] = float("-inf")
    with pytest.raises(ValueError, match=r"entirely -inf.*rows 2"):
        topk_pseudo_labels(logits, 5, backend=backend)


def test_unknown_or_impossible_backend():
    with pytest.raises(ValueError, match="not a backend"):
        topk_pseudo_labels(torch.randn(2, 10), 2, backend="fastest")
    with pytest.raises(ValueError, match="no 'triton' backend"):
        topk_pseudo_labels(torch.randn(2, 10), 2, backend="triton")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        topk_pseudo_labels(torch.randn(2, 10), 2, backend="cuda")


@needs_ext
@pytest.mark.parametrize(
    "args,error",
    [
        ((torch.randn(3, 10), 0, 1.0), ValueError),
        ((torch.randn(3, 10), 11, 1.0), ValueError),
        ((torch.randn(3, 2000), 1025, 1.0), ValueError),
        ((torch.randn(3, 10), 2, 0.0), ValueError),
        ((torch.randn(3, 10), 2, float("nan")), ValueError),
        ((torch.randn(10), 2, 1.0), ValueError),
        ((torch.randint(0, 3, (3, 10)), 2, 1.0), TypeError),
        ((torch.randn(10, 3).t(), 2, 1.0), ValueError),
    ],
)
def test_extension_checks_its_own_arguments(args, error):
    """The C++ op is callable without the Python wrapper: it must refuse bad input itself."""
    with pytest.raises(error):
        torch.ops.clinkd.topk_pseudo_labels_ext(*args)


@needs_ext
def test_custom_op_registration():
    torch.library.opcheck(torch.ops.clinkd.topk_pseudo_labels_ext.default, (torch.randn(5, 300), 7, 0.5))


# --- CUDA ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,v,k", [(64, 151936, 64), (33, 4099, 1024), (17, 1000, 1), (5, 3, 3), (3, 1, 1)])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_cuda_matches_reference(dtype, n, v, k, temperature):
    logits = (torch.randn(n, v, device="cuda") * 4).to(dtype)
    check_against_reference(logits, k, temperature, "cuda")


@pytest.mark.gpu
def test_cuda_special_values_and_ties():
    logits = torch.randint(-3, 4, (8, 5000), device="cuda").float()
    logits[1, 100] = float("inf")
    logits[2, 200:4000] = float("-inf")
    logits[3, :] = float("-inf")
    logits[3, 4999] = 1.0
    check_against_reference(logits, 300, 1.0, "cuda")
    strided = torch.randn(6, 9000, device="cuda")[:, 11:8011]
    check_against_reference(strided, 32, 1.0, "cuda")


@pytest.mark.gpu
def test_cuda_errors_and_device_mismatch():
    logits = torch.randn(4, 100, device="cuda")
    logits[1, 3] = float("nan")
    with pytest.raises(ValueError, match="rows 1"):
        topk_pseudo_labels(logits, 4, backend="cuda")
    with pytest.raises(RuntimeError, match="needs CPU tensors"):
        topk_pseudo_labels(torch.randn(4, 100, device="cuda"), 4, backend="cpu")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        topk_pseudo_labels(torch.randn(4, 100), 4, backend="cuda")
