"""apply_mrope: forward and backward of every backend against a float64 reference, layouts, errors."""

from __future__ import annotations

import pytest
import torch

from clinkd_kernels.rope import apply_mrope, apply_mrope_reference
from clinkd_kernels.rope.op import mrope_rotate
from tests.numerics import assert_close

# (D, sections): D/2 = sum of the sections
SHAPES = [(128, (16, 24, 24)), (64, (8, 12, 12)), (80, (8, 16, 16)), (96, (16, 16, 16))]


def inv_freq_for(D, base=10000.0):
    return 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))


def make_inputs(B, S, Hq, Hkv, D, dtype, device, *, max_pos=30000):
    q = torch.randn(B, S, Hq, D, device=device).to(dtype)
    k = torch.randn(B, S, Hkv, D, device=device).to(dtype)
    pos = torch.randint(0, max_pos, (3, B, S), device=device)
    return q, k, pos, inv_freq_for(D).to(device)


def check_forward(q, k, pos, inv, sec, backend, scale=1.0, name=""):
    q_rot, k_rot = apply_mrope(q, k, pos, inv, sec, attention_scaling=scale, backend=backend)
    assert q_rot.shape == q.shape and k_rot.shape == k.shape
    assert q_rot.dtype == q.dtype and q_rot.is_contiguous() and k_rot.is_contiguous()
    ref_q, ref_k = apply_mrope_reference(q.double(), k.double(), pos, inv, sec, attention_scaling=scale)
    base_q, base_k = apply_mrope_reference(q, k, pos, inv, sec, attention_scaling=scale)
    assert_close(f"{name} q", q_rot, ref_q, base_q)
    assert_close(f"{name} k", k_rot, ref_k, base_k)


def check_backward(q, k, pos, inv, sec, backend, scale=1.0, name=""):
    """Gradients of q and k against the float64 reference's autograd, with the same-dtype torch baseline."""
    gq = torch.randn(q.shape, device=q.device, dtype=torch.float64)
    gk = torch.randn(k.shape, device=k.device, dtype=torch.float64)
    grads = {}
    for label, fn, cast in (
        ("out", lambda a, b: apply_mrope(a, b, pos, inv, sec, attention_scaling=scale, backend=backend), q.dtype),
        ("ref", lambda a, b: apply_mrope_reference(a, b, pos, inv, sec, attention_scaling=scale), torch.float64),
        ("base", lambda a, b: apply_mrope_reference(a, b, pos, inv, sec, attention_scaling=scale), q.dtype),
    ):
        a = q.detach().to(cast).requires_grad_()
        b = k.detach().to(cast).requires_grad_()
        oq, ok = fn(a, b)
        torch.autograd.backward((oq, ok), (gq.to(oq.dtype), gk.to(ok.dtype)))
        grads[label] = (a.grad, b.grad)
    assert grads["out"][0].dtype == q.dtype
    assert_close(f"{name} dq", grads["out"][0], grads["ref"][0], grads["base"][0], dtype=q.dtype)
    assert_close(f"{name} dk", grads["out"][1], grads["ref"][1], grads["base"][1], dtype=q.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernel (interpreter on CPU)


@pytest.mark.parametrize("D, sec", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_forward_backward(interpreter, D, sec, dtype):
    # odd S, GQA (Hq = 3·Hkv), positions up to 3e4
    q, k, pos, inv = make_inputs(2, 7, 6, 2, D, dtype, interpreter)
    check_forward(q, k, pos, inv, sec, "triton", name=f"D={D} {dtype}")
    check_backward(q, k, pos, inv, sec, "triton", name=f"D={D} {dtype}")


def test_triton_heads_more_than_a_block_and_split(interpreter):
    # Hq = 19 > BLOCK_HQ (16) so the head loop runs twice; then every split of the heads over programs
    from clinkd_kernels.rope.launch import mrope_rotate_triton
    from clinkd_kernels.rope.layout import axis_tensor

    q, k, pos, inv = make_inputs(1, 3, 19, 3, 128, torch.float32, interpreter, max_pos=10**6)
    sec = (16, 24, 24)
    ref_q, ref_k = apply_mrope_reference(q.double(), k.double(), pos, inv, sec, attention_scaling=0.7)
    base_q, base_k = apply_mrope_reference(q, k, pos, inv, sec, attention_scaling=0.7)
    for split in (1, 2, 3):
        q_out, k_out = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
        mrope_rotate_triton(q, k, q_out, k_out, pos, inv, axis_tensor(sec, False, q.device), 0.7, False, split=split)
        assert_close(f"q split={split}", q_out, ref_q, base_q)
        assert_close(f"k split={split}", k_out, ref_k, base_k)


def test_triton_batch_larger_than_grid_axis(interpreter, monkeypatch):
    import clinkd_kernels.rope.launch as launch

    monkeypatch.setattr(launch, "_MAX_GRID_YZ", 2)  # the real limit is 65535 rows; slices of 2 here
    q, k, pos, inv = make_inputs(5, 2, 3, 1, 64, torch.float32, interpreter)
    check_forward(q, k, pos, inv, (8, 12, 12), "triton", name="batch slices")


def test_triton_strided_views_packed_and_int32_positions(interpreter):
    # q, k as views of a fused qkv projection [B, S, (Hq + 2·Hkv)·D]; positions a strided slice
    B, S, Hq, Hkv, D, sec = 2, 5, 4, 2, 64, (8, 12, 12)
    qkv = torch.randn(B, S, (Hq + 2 * Hkv) * D, device=interpreter)
    q = qkv[..., : Hq * D].view(B, S, Hq, D)
    k = qkv[..., Hq * D : (Hq + Hkv) * D].view(B, S, Hkv, D)
    assert not q.is_contiguous()
    pos = torch.randint(0, 5000, (3, B, 2 * S), device=interpreter)[..., ::2].int()
    inv = inv_freq_for(D).to(interpreter)
    check_forward(q, k, pos, inv, sec, "triton", scale=1.3, name="strided")
    check_backward(q, k, pos, inv, sec, "triton", scale=1.3, name="strided")
    # packed [T, H, D] with position_ids [3, T]
    qp, kp, posp = q.reshape(B * S, Hq, D), k.reshape(B * S, Hkv, D), pos.reshape(3, B * S)
    check_forward(qp, kp, posp, inv, sec, "triton", name="packed")
    # last dim not contiguous: copied first, same result
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert qt.stride(-1) != 1
    check_forward(qt, k, pos, inv, sec, "triton", name="transposed")


def test_triton_double_backward(interpreter):
    # the backward is the same op by -θ, so second derivatives flow; grad-of-grad rotates back by +θ
    q, k, pos, inv = make_inputs(1, 3, 2, 1, 64, torch.float32, interpreter)
    sec = (8, 12, 12)
    q.requires_grad_()
    gq = torch.randn_like(q, requires_grad=True)
    q_rot, k_rot = apply_mrope(q, k, pos, inv, sec, backend="triton")
    (dq,) = torch.autograd.grad(q_rot, q, gq, create_graph=True)
    v = torch.randn_like(q)
    (dgq,) = torch.autograd.grad(dq, gq, v)
    want = apply_mrope_reference(v.double(), k.double(), pos, inv, sec)[0]
    assert_close("double backward", dgq, want, apply_mrope_reference(v, k, pos, inv, sec)[0])


# --------------------------------------------------------------------------------------------------
# CPU torch path and the reference backend


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("D, sec", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_backends(backend, D, sec, dtype):
    q, k, pos, inv = make_inputs(2, 9, 4, 1, D, dtype, "cpu")
    check_forward(q, k, pos, inv, sec, backend, scale=0.9, name=backend)
    check_backward(q, k, pos, inv, sec, backend, scale=0.9, name=backend)


def test_cpu_path_chunks_and_strides(monkeypatch):
    import clinkd_kernels.rope.cpu as cpu

    monkeypatch.setattr(cpu, "_CPU_CHUNK_ELEMS", 3 * 7 * 64)  # 2 tokens per chunk → odd last chunk
    B, S, Hq, Hkv, D, sec = 2, 7, 5, 2, 64, (8, 12, 12)
    qkv = torch.randn(B, S, (Hq + 2 * Hkv) * D)
    q = qkv[..., : Hq * D].view(B, S, Hq, D)
    k = qkv[..., Hq * D : (Hq + Hkv) * D].view(B, S, Hkv, D)
    pos = torch.randint(0, 50000, (3, S, B)).transpose(1, 2)
    check_forward(q, k, pos, inv_freq_for(D), sec, "cpu", name="cpu chunks")
    check_backward(q, k, pos, inv_freq_for(D), sec, "cpu", name="cpu chunks")


def test_default_backend_and_env(monkeypatch):
    q, k, pos, inv = make_inputs(1, 3, 2, 2, 64, torch.float32, "cpu")
    sec = (8, 12, 12)
    want = apply_mrope(q, k, pos, inv, sec, backend="cpu")
    got = apply_mrope(q, k, pos, inv, sec)  # CPU default: the cpu path
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    monkeypatch.setenv("CLINKD_BACKEND", "torch")
    got = apply_mrope(q, k, pos, inv, sec)
    assert_close("env torch", got[0], apply_mrope_reference(q.double(), k.double(), pos, inv, sec)[0], want[0])
    monkeypatch.setenv("CLINKD_BACKEND", "cuda")
    with pytest.raises(ValueError, match="no 'cuda' backend"):
        apply_mrope(q, k, pos, inv, sec)


def test_opcheck_and_compile(interpreter):
    q, k, pos, inv = make_inputs(1, 3, 2, 1, 64, torch.float32, "cpu")
    q.requires_grad_()
    k.requires_grad_()
    for backend, device in (("cpu", "cpu"), ("triton", interpreter)):
        qq, kk, pp, ii = (t.detach().to(device).requires_grad_(t.requires_grad) for t in (q, k, pos, inv))
        for sec, interleaved in (([8, 12, 12], False), ([12, 10, 10], True)):
            torch.library.opcheck(
                mrope_rotate,
                (qq, kk, pp, ii, sec, interleaved, 1.0, False, backend),
                test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
            )
    for sec, interleaved in (((8, 12, 12), False), ((12, 10, 10), True)):

        def rotate(a, b, sec=sec, interleaved=interleaved):
            return apply_mrope(a, b, pos, inv, sec, mrope_interleaved=interleaved, backend="cpu")

        compiled = torch.compile(rotate, fullgraph=True)
        got = compiled(q, k)
        want = apply_mrope(q, k, pos, inv, sec, mrope_interleaved=interleaved, backend="cpu")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --------------------------------------------------------------------------------------------------
# Errors


def test_errors():
    q, k, pos, inv = make_inputs(2, 5, 4, 2, 64, torch.float32, "cpu")
    sec = (8, 12, 12)
    cases = [
        (ValueError, "sum to D/2 = 32", dict(mrope_section=(8, 12, 11))),
        (ValueError, "mrope_section", dict(mrope_section=(16, 16))),
        (ValueError, "mrope_section", dict(mrope_section=(-2, 22, 12))),
        (ValueError, r"position_ids must have shape \[3, 2, 5\]", dict(position_ids=pos[:2])),
        (ValueError, r"position_ids must have shape \[3, 2, 5\]", dict(position_ids=pos[:, :, :4])),
        (TypeError, "position_ids", dict(position_ids=pos.float())),
        (ValueError, "same head dim", dict(k=k[..., :32])),
        (ValueError, "batch and sequence", dict(k=k[:, :4])),
        (ValueError, "batch and sequence", dict(k=k[:1])),
        (TypeError, "q must have dtype", dict(q=q.long())),
        (TypeError, "k must have dtype", dict(k=k.int())),
        (TypeError, "one dtype", dict(k=k.half())),
        (ValueError, "even", dict(q=q[..., :63], k=k[..., :63], inv_freq=inv[:31])),
        (ValueError, "inv_freq must have shape", dict(inv_freq=inv[:31])),
        (TypeError, "inv_freq", dict(inv_freq=inv.double())),
        (ValueError, "both be 4-D", dict(k=k[0])),
        (ValueError, "attention_scaling", dict(attention_scaling=0.0)),
        (ValueError, "no 'cuda' backend", dict(backend="cuda")),
    ]
    base = dict(q=q, k=k, position_ids=pos, inv_freq=inv, mrope_section=sec)
    for exc, match, change in cases:
        kw = {**base, **change}
        args = [kw.pop(n) for n in ("q", "k", "position_ids", "inv_freq", "mrope_section")]
        with pytest.raises(exc, match=match):
            apply_mrope(*args, **kw)
    with pytest.raises(ValueError, match="head dim must be even and in"):
        big = torch.randn(1, 1, 1, 258)
        apply_mrope(big, big, torch.zeros(3, 1, 1, dtype=torch.long), inv_freq_for(258), (43, 43, 43))


# --------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("D, sec", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_triton(D, sec, dtype):
    q, k, pos, inv = make_inputs(2, 301, 28, 4, D, dtype, "cuda", max_pos=40000)
    check_forward(q, k, pos, inv, sec, "triton", name=f"gpu D={D} {dtype}")
    check_backward(q, k, pos, inv, sec, "triton", name=f"gpu D={D} {dtype}")
    q1, k1, pos1, _ = make_inputs(1, 1, 28, 4, D, dtype, "cuda")  # one decode token: head split path
    check_forward(q1, k1, pos1, inv, sec, "triton", name=f"gpu decode D={D} {dtype}")
