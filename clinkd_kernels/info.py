"""``python -m clinkd_kernels.info``: versions, built backends and a quick self-check of every op.

Each self-check runs the op on small random inputs with every backend that can run here and
compares it with the op's float64 reference. Exit status 1 if any check fails.
"""

from __future__ import annotations

import platform
import sys
import traceback

import torch

from clinkd_kernels._dispatch import extension, extension_has_cuda, triton_available


def _versions() -> list[tuple[str, str]]:
    rows = [
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch CUDA", str(torch.version.cuda)),
    ]
    for name in ("triton", "transformers", "numpy"):
        try:
            module = __import__(name)
            rows.append((name, module.__version__))
        except ImportError:
            rows.append((name, "not installed"))
    return rows


def _backends() -> list[tuple[str, str]]:
    ext = extension()
    rows = [("C++ CPU kernels", "built" if ext is not None else "NOT BUILT (pip install --no-build-isolation .)")]
    if ext is not None and ext.has_cuda():
        rows.append(("CUDA kernels", f"built for compute capabilities {ext.cuda_archs()}"))
    else:
        rows.append(("CUDA kernels", "not built"))
    rows.append(("Triton", "available" if triton_available() else "not installed"))
    if torch.cuda.is_available():
        rows.append(
            (
                "CUDA device",
                f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})",
            )
        )
    else:
        rows.append(("CUDA device", "none (Triton kernels run only under TRITON_INTERPRET=1)"))
    return rows


def _check_topk(device: str, backend: str) -> str:
    from clinkd_kernels.topk import topk_pseudo_labels, topk_pseudo_labels_reference

    logits = torch.randn(37, 5003, device=device) * 3
    got = topk_pseudo_labels(logits, 17, temperature=0.5, backend=backend)
    ref = topk_pseudo_labels_reference(logits, 17, temperature=0.5)
    if not torch.equal(got.indices.cpu(), ref.indices.cpu()):
        raise AssertionError("indices differ from the reference")
    err = max(
        (getattr(got, f).double().cpu() - getattr(ref, f).cpu()).abs().max().item()
        for f in ("logprobs", "lse", "margin", "residual")
    )
    if err > 1e-4:
        raise AssertionError(f"max error {err:.2e} against the float64 reference")
    return f"max abs error {err:.1e}"


def _check_rope_index(device: str, backend: str) -> str:
    from clinkd_kernels.rope_index import mcg_rope_index, mcg_rope_index_reference

    img, start = 9, 8  # placeholder and vision-start ids
    rows = [[1, 2, start] + [img] * 4 + [3, 4, 5], [0, 0, 6, start] + [img] * 4 + [7, 5]]
    ids = torch.tensor(rows, device=device)
    mask = torch.tensor([[1] * 10, [0, 0] + [1] * 8], device=device)
    grids = torch.tensor([[1, 4, 4], [1, 4, 4]], device=device)
    kw = dict(
        image_grid_thw=grids,
        attention_mask=mask,
        image_token_id=img,
        video_token_id=99,
        vision_start_token_id=start,
        modality_gap=2,
    )
    pos, deltas = mcg_rope_index(ids, **kw)
    ref_pos, ref_deltas = mcg_rope_index_reference(
        ids.cpu(), **{k: v.cpu() if torch.is_tensor(v) else v for k, v in kw.items()}
    )
    if not (torch.equal(pos.cpu(), ref_pos) and torch.equal(deltas.cpu(), ref_deltas)):
        raise AssertionError("positions differ from the reference")
    return "exact"


def _check_apply_mrope(device: str, backend: str) -> str:
    from clinkd_kernels.rope import apply_mrope, apply_mrope_reference

    q, k = torch.randn(2, 37, 6, 64, device=device), torch.randn(2, 37, 2, 64, device=device)
    pos = torch.randint(0, 5000, (3, 2, 37), device=device)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2, device=device).float() / 64))
    got = apply_mrope(q, k, pos, inv_freq, (8, 12, 12), backend=backend)
    ref = apply_mrope_reference(q.double().cpu(), k.double().cpu(), pos.cpu(), inv_freq.cpu(), (8, 12, 12))
    err = max((g.double().cpu() - r).abs().max().item() for g, r in zip(got, ref))
    if err > 1e-4:
        raise AssertionError(f"max error {err:.2e} against the float64 reference")
    return f"max abs error {err:.1e}"


def _check_attention(device: str, backend: str) -> str:
    from clinkd_kernels.attention import mcg_rope_attention, mcg_rope_attention_reference

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q = torch.randn(2, 33, 4, 64, device=device, dtype=dtype)
    k, v = (torch.randn(2, 33, 2, 64, device=device, dtype=dtype) for _ in range(2))
    pos = torch.randint(0, 300, (3, 2, 33), device=device)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2, device=device).float() / 64))
    mask = torch.ones(2, 33, dtype=torch.long, device=device)
    mask[1, :5] = 0
    got = mcg_rope_attention(q, k, v, pos, inv_freq, (8, 12, 12), attention_mask=mask, backend=backend)
    ref = mcg_rope_attention_reference(
        q.double(), k.double(), v.double(), pos, inv_freq, (8, 12, 12), attention_mask=mask
    )
    err = (got.double() - ref).abs().max().item()
    if err > (1e-4 if dtype == torch.float32 else 3e-2):
        raise AssertionError(f"max error {err:.2e} against the float64 reference")
    return f"max abs error {err:.1e}"


def _check_kd_loss(device: str, backend: str) -> str:
    from clinkd_kernels.loss import linear_kd_loss, linear_kd_loss_reference

    hidden, weight = torch.randn(45, 32, device=device), torch.randn(1001, 32, device=device) / 4
    t_hidden, t_weight = torch.randn(45, 48, device=device), torch.randn(1100, 48, device=device) / 4
    labels = torch.randint(0, 1001, (45,), device=device)
    labels[::7] = -100
    kw = dict(teacher_hidden=t_hidden, teacher_weight=t_weight, temperature=0.5, alpha=0.5, beta=1.0)
    got = linear_kd_loss(hidden, weight, labels, backend=backend, **kw)
    ref = linear_kd_loss_reference(
        hidden.double(), weight.double(), labels, **{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()}
    )
    err = abs(got.item() - ref.item())
    if err > 1e-4:
        raise AssertionError(f"error {err:.2e} against the float64 reference")
    return f"abs error {err:.1e}"


def _self_checks() -> list[tuple[str, str, str, str]]:
    """(op, backend, device, result) rows."""
    plans = [
        ("topk_pseudo_labels", "torch", "cpu", _check_topk),
        ("mcg_rope_index", "default", "cpu", _check_rope_index),
        ("apply_mrope", "cpu", "cpu", _check_apply_mrope),
        ("mcg_rope_attention", "cpu", "cpu", _check_attention),
        ("linear_kd_loss", "cpu", "cpu", _check_kd_loss),
    ]
    if extension() is not None:
        plans.append(("topk_pseudo_labels", "cpu", "cpu", _check_topk))
    if torch.cuda.is_available():
        plans += [
            ("mcg_rope_index", "default", "cuda", _check_rope_index),
            ("apply_mrope", "triton", "cuda", _check_apply_mrope),
            ("mcg_rope_attention", "triton", "cuda", _check_attention),
            ("linear_kd_loss", "triton", "cuda", _check_kd_loss),
        ]
        if extension_has_cuda():
            plans.append(("topk_pseudo_labels", "cuda", "cuda", _check_topk))
    rows = []
    for op, backend, device, check in plans:
        try:
            rows.append((op, backend, device, "ok, " + check(device, backend)))
        except Exception as exc:  # report every failure, then exit non-zero
            traceback.print_exc()
            rows.append((op, backend, device, f"FAILED: {exc}"))
    return rows


def _table(header: tuple[str, ...], rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    print("# clinkd_kernels\n")
    print(_table(("component", "version"), _versions()), "\n")
    print(_table(("backend", "status"), _backends()), "\n")
    checks = _self_checks()
    print(_table(("op", "backend", "device", "self-check"), checks))
    failed = [row for row in checks if row[3].startswith("FAILED")]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} self-checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
