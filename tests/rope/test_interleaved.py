"""apply_mrope with mrope_interleaved=True (Qwen3-VL's interleaved M-RoPE) against a float64 reference
written from transformers' Qwen3-VL source, not from clinkd's reference.py.

The reference, ``qwen3vl_rotary`` (tests/rope/qwen3vl.py), follows ``Qwen3VLTextRotaryEmbedding.forward`` +
``recomposition_frequencies`` and ``apply_rotary_pos_emb`` / ``rotate_half`` of transformers
(models/qwen3_vl/modeling_qwen3_vl.py) step by step:

    freqs  = position_ids[..., None].float() * inv_freq.float()     [3, *tokens, D/2] fp32 (θ stays this product)
    cos    = cos(freqs) · attention_scaling, sin likewise              (in ``compute``: float64 for the reference)
    recompose: start from the t row, overwrite slots slice(1, 3·s_h, 3) with the h row and
               slice(2, 3·s_w, 3) with the w row, then cat((x, x)) to D
    out    = q·cos + rotate_half(q)·sin

``test_recipe_matches_transformers`` pins it to the installed transformers module. The baseline of the
§4 rule (tests/numerics.py) is the same recipe computed in fp32 and rounded once to the input dtype.
"""

from __future__ import annotations

import pytest
import torch

from clinkd_kernels import apply_mrope, mcg_rope_attention
from clinkd_kernels.rope.layout import check_mrope_section
from tests.numerics import assert_close
from tests.rope.qwen3vl import inv_freq_for, qwen3vl_cos_sin, qwen3vl_rotary

# (D, sections) that fit the interleaved layout: 3·s_h − 1 ≤ D/2 and 3·s_w ≤ D/2
SHAPES = [(128, (24, 20, 20)), (64, (12, 10, 10)), (80, (14, 13, 13))]
BACKENDS = ["cpu", "torch", "triton"]


def make_inputs(lead, Hq, Hkv, D, dtype, device, *, max_pos=30000):
    q = torch.randn(*lead, Hq, D, device=device).to(dtype)
    k = torch.randn(*lead, Hkv, D, device=device).to(dtype)
    pos = torch.randint(0, max_pos, (3, *lead), device=device)  # distinct t, h, w rows
    return q, k, pos, inv_freq_for(D).to(device)


def check_forward(q, k, pos, inv, sec, backend, scale, name):
    q_rot, k_rot = apply_mrope(q, k, pos, inv, sec, attention_scaling=scale, mrope_interleaved=True, backend=backend)
    assert q_rot.shape == q.shape and k_rot.shape == k.shape
    assert q_rot.dtype == q.dtype and k_rot.dtype == k.dtype
    ref_q, ref_k = qwen3vl_rotary(q.double(), k.double(), pos, inv, sec, attention_scaling=scale)
    base_q, base_k = qwen3vl_rotary(q, k, pos, inv, sec, attention_scaling=scale, compute=torch.float32)
    assert_close(f"{name} q", q_rot, ref_q, base_q)
    assert_close(f"{name} k", k_rot, ref_k, base_k)


def check_backward(q, k, pos, inv, sec, backend, scale, name):
    """dq, dk for a random upstream gradient, against autograd through the float64 recipe."""
    gq = torch.randn(q.shape, device=q.device, dtype=torch.float64)
    gk = torch.randn(k.shape, device=k.device, dtype=torch.float64)
    runs = {
        "out": (
            q.dtype,
            lambda a, b: apply_mrope(
                a, b, pos, inv, sec, attention_scaling=scale, mrope_interleaved=True, backend=backend
            ),
        ),
        "ref": (torch.float64, lambda a, b: qwen3vl_rotary(a, b, pos, inv, sec, attention_scaling=scale)),
        "base": (
            q.dtype,
            lambda a, b: qwen3vl_rotary(a, b, pos, inv, sec, attention_scaling=scale, compute=torch.float32),
        ),
    }
    grads = {}
    for label, (dtype, fn) in runs.items():
        a = q.detach().to(dtype).requires_grad_()
        b = k.detach().to(dtype).requires_grad_()
        oq, ok = fn(a, b)
        torch.autograd.backward((oq, ok), (gq.to(dtype), gk.to(dtype)))
        grads[label] = (a.grad, b.grad)
    assert grads["out"][0].dtype == q.dtype and grads["out"][1].dtype == k.dtype
    assert_close(f"{name} dq", grads["out"][0], grads["ref"][0], grads["base"][0], dtype=q.dtype)
    assert_close(f"{name} dk", grads["out"][1], grads["ref"][1], grads["base"][1], dtype=q.dtype)


def device_for(backend, interpreter):
    return interpreter if backend == "triton" else torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# The reference is transformers' Qwen3-VL rotary


@pytest.mark.parametrize("D, sec, scale", [(128, (24, 20, 20), 1.0), (64, (12, 10, 10), 0.75)])
def test_recipe_matches_transformers(D, sec, scale):
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding, apply_rotary_pos_emb

    config = Qwen3VLTextConfig(
        vocab_size=32,
        hidden_size=2 * D,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=D,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": list(sec),
            "mrope_interleaved": True,
        },
    )
    rotary = Qwen3VLTextRotaryEmbedding(config)
    rotary.attention_scaling = scale  # the default rope type has 1.0; forward multiplies cos/sin by it
    assert torch.equal(rotary.inv_freq, inv_freq_for(D))

    B, S, Hq, Hkv = 2, 9, 3, 1
    q, k, pos, inv = make_inputs((B, S), Hq, Hkv, D, torch.float32, "cpu")
    cos, sin = rotary(q, pos)  # [B, S, D] fp32
    q_tf, k_tf = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [B, H, S, D]
    q_tf, k_tf = q_tf.transpose(1, 2), k_tf.transpose(1, 2)

    # the fp32 recipe is transformers' computation: same operations on the same values
    q32, k32 = qwen3vl_rotary(q, k, pos, inv, sec, attention_scaling=scale, compute=torch.float32)
    torch.testing.assert_close(q32, q_tf, rtol=0, atol=0)
    torch.testing.assert_close(k32, k_tf, rtol=0, atol=0)
    cos64, sin64 = qwen3vl_cos_sin(pos, inv, sec, attention_scaling=scale)
    torch.testing.assert_close(cos64.float(), cos, rtol=0, atol=2e-7)
    torch.testing.assert_close(sin64.float(), sin, rtol=0, atol=2e-7)
    # the float64 reference differs from it by fp32 roundings only
    q64, k64 = qwen3vl_rotary(q.double(), k.double(), pos, inv, sec, attention_scaling=scale)
    torch.testing.assert_close(q64, q_tf.double(), rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(k64, k_tf.double(), rtol=1e-6, atol=2e-6)
    # and it really is interleaved: frequency 1 follows h, 2 follows w, 3·s_h + 1 (past the h slots) t
    theta = pos[..., None].float() * inv
    assert torch.equal(cos64[..., 1], theta[1, ..., 1].double().cos() * scale)
    assert torch.equal(cos64[..., 2], theta[2, ..., 2].double().cos() * scale)
    assert torch.equal(cos64[..., 3 * sec[1] + 1], theta[0, ..., 3 * sec[1] + 1].double().cos() * scale)


@pytest.mark.parametrize("D, sec", SHAPES)
def test_sections_fit_the_interleaved_layout(D, sec):
    assert check_mrope_section(sec, D // 2, True) == sec


# --------------------------------------------------------------------------------------------------
# Forward and backward of every backend


# Triton (interpreter) in fp32 and fp16; the torch paths also in bf16
BACKEND_DTYPES = [(b, d) for b in BACKENDS for d in ("fp32", "fp16", "bf16") if (b, d) != ("triton", "bf16")]
_DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, ids=[f"{b}-{d}" for b, d in BACKEND_DTYPES])
@pytest.mark.parametrize("D, sec", SHAPES, ids=[f"D{d}" for d, _ in SHAPES])
def test_forward_backward(interpreter, backend, D, sec, dtype):
    dtype = _DT[dtype]
    device = device_for(backend, interpreter)
    # odd S, GQA (Hq = 3·Hkv), positions up to 3e4 with distinct t/h/w rows, attention_scaling ≠ 1
    q, k, pos, inv = make_inputs((2, 7), 6, 2, D, dtype, device)
    name = f"{backend} D={D} {dtype}"
    check_forward(q, k, pos, inv, sec, backend, 0.85, name)
    check_backward(q, k, pos, inv, sec, backend, 0.85, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_packed_and_int32_positions(interpreter, backend, dtype):
    # packed q [T, Hq, D], k [T, Hkv, D], position_ids [3, T] (int32), T odd
    device = device_for(backend, interpreter)
    q, k, pos, inv = make_inputs((11,), 3, 1, 128, dtype, device)
    pos = pos.int()
    check_forward(q, k, pos, inv, (24, 20, 20), backend, 1.25, f"packed {backend}")
    check_backward(q, k, pos, inv, (24, 20, 20), backend, 1.25, f"packed {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_of_fused_qkv(interpreter, backend):
    device = device_for(backend, interpreter)
    B, S, Hq, Hkv, D, sec = 2, 5, 3, 1, 64, (12, 10, 10)
    qkv = torch.randn(B, S, (Hq + 2 * Hkv) * D, device=device)
    q = qkv[..., : Hq * D].view(B, S, Hq, D)
    k = qkv[..., Hq * D : (Hq + Hkv) * D].view(B, S, Hkv, D)
    assert not q.is_contiguous()
    pos = torch.randint(0, 30000, (3, B, 2 * S), device=device)[..., ::2]
    check_forward(q, k, pos, inv_freq_for(D).to(device), sec, backend, 1.0, f"strided {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_largest_sections_that_fit(interpreter, backend):
    # D = 64: (11, 11, 10) puts h on 1, 4, …, 31 (the last frequency) and w on 2, …, 29: it fits.
    device = device_for(backend, interpreter)
    sec = (11, 11, 10)
    assert check_mrope_section(sec, 32, True) == sec
    q, k, pos, inv = make_inputs((1, 5), 2, 2, 64, torch.float32, device)
    check_forward(q, k, pos, inv, sec, backend, 1.0, f"(11, 11, 10) {backend}")


# --------------------------------------------------------------------------------------------------
# The flag matters, and only where t, h, w differ


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D, sec", SHAPES[:2], ids=["D128", "D64"])
def test_interleaved_differs_from_contiguous(interpreter, backend, D, sec):
    device = device_for(backend, interpreter)
    q, k, pos, inv = make_inputs((1, 5), 2, 1, D, torch.float32, device)
    inter = apply_mrope(q, k, pos, inv, sec, mrope_interleaved=True, backend=backend)
    contig = apply_mrope(q, k, pos, inv, sec, mrope_interleaved=False, backend=backend)
    default = apply_mrope(q, k, pos, inv, sec, backend=backend)
    for a, b, c in zip(inter, contig, default):
        assert torch.equal(b, c), "the default layout is not the contiguous one"
        assert (a - b).abs().max() > 0.1, "mrope_interleaved=True gave the contiguous result"
    # the contiguous sections are not the interleaved recipe either (the tests can tell the layouts apart)
    ref_q, _ = qwen3vl_rotary(q.double(), k.double(), pos, inv, sec)
    assert (contig[0].double() - ref_q).abs().max() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_text_positions_layouts_agree(interpreter, backend, packed):
    # t = h = w (text-only tokens): every frequency sees the same position, so the layouts are one map
    device = device_for(backend, interpreter)
    lead = (13,) if packed else (2, 7)
    q, k, pos, inv = make_inputs(lead, 3, 1, 128, torch.float16, device)
    pos = pos[:1].expand(3, *lead)
    sec = (24, 20, 20)
    inter = apply_mrope(q, k, pos, inv, sec, mrope_interleaved=True, attention_scaling=0.9, backend=backend)
    contig = apply_mrope(q, k, pos, inv, sec, mrope_interleaved=False, attention_scaling=0.9, backend=backend)
    for a, b in zip(inter, contig):
        assert torch.equal(a, b)
    check_forward(q, k, pos, inv, sec, backend, 0.9, f"text {backend}")


# --------------------------------------------------------------------------------------------------
# Errors


def attention_args(D, Hq=2, Hkv=1):
    q, k, pos, inv = make_inputs((1, 3), Hq, Hkv, D, torch.float32, "cpu")
    return q, k, torch.randn_like(k), pos, inv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flag", [1, 0, "True", None, torch.tensor(True)], ids=["1", "0", "str", "None", "tensor"])
def test_interleaved_flag_must_be_bool(backend, flag):
    q, k, v, pos, inv = attention_args(64)
    with pytest.raises(TypeError, match="mrope_interleaved"):
        apply_mrope(q, k, pos, inv, (12, 10, 10), mrope_interleaved=flag, backend=backend)
    with pytest.raises(TypeError, match="mrope_interleaved"):
        mcg_rope_attention(q, k, v, pos, inv, (12, 10, 10), mrope_interleaved=flag, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "D, sec", [(64, (8, 12, 12)), (64, (10, 11, 11)), (64, (9, 12, 11)), (128, (16, 24, 24)), (80, (8, 16, 16))]
)
def test_sections_that_do_not_fit(backend, D, sec):
    # h needs slots 1, 4, …, 3·s_h − 2 and w slots 2, 5, …, 3·s_w − 1 among the D/2 frequencies
    q, k, v, pos, inv = attention_args(D)
    with pytest.raises(ValueError, match="mrope_section"):
        apply_mrope(q, k, pos, inv, sec, mrope_interleaved=True, backend=backend)
    with pytest.raises(ValueError, match="mrope_section"):
        mcg_rope_attention(q, k, v, pos, inv, sec, mrope_interleaved=True, backend=backend)
    # the same sections are fine in the contiguous layout
    apply_mrope(q, k, pos, inv, sec, mrope_interleaved=False, backend="torch")
    mcg_rope_attention(q, k, v, pos, inv, sec, mrope_interleaved=False, backend="torch")
