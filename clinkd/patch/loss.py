"""Causal-LM loss without [tokens × vocab] logits: a replacement for ``<P>ForConditionalGeneration.forward``,
and helpers for trainers that distil with a teacher.

With labels [B,S], the stock forward computes logits = lm_head(hidden) [B,S,V] and then
cross-entropy with the next-token shift. The replacement runs the same decoder and computes

    rows, targets = next_token_targets(labels)        targets[i] = labels[b, s+1], rows with -100 dropped
    loss = linear_kd_loss(hidden[rows], lm_head.weight, targets, alpha=0, beta=1)     (plain CE)

chunk by chunk over the vocabulary-sized logits, so they never exist for the whole batch. As in
transformers, ``shift_labels`` (already shifted) may replace ``labels``, and ``num_items_in_batch``
turns the mean into sum / num_items_in_batch (gradient accumulation). Logits are returned only when
asked: ``return_logits=True``, or by default when the model is in eval mode (so evaluation loops
that read logits keep working); otherwise ``logits`` is None. Without labels the stock forward runs.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from clinkd_kernels.loss import linear_kd_loss

from .head import call_in_forward, check_full_weight


def next_token_targets(
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    drop_ignored: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the flattened [B·S] hidden states that carry a next-token target, and those targets.

    labels [B,S] (target of position s is labels[b, s+1]; the last position has none), or
    shift_labels [B,S] already shifted. Returns (rows int64 [N], targets int64 [N]); with
    drop_ignored=False every row is kept (N = B·S) and ignored ones hold ``ignore_index``.
    Use the same rows for the student's and the teacher's hidden states.
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("next_token_targets needs labels [B,S] or shift_labels [B,S]")
        if labels.dim() != 2:
            raise ValueError(f"labels must be [B,S], got shape {list(labels.shape)}")
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    targets = shift_labels.reshape(-1).long()
    if not drop_ignored or torch.compiler.is_compiling():
        return torch.arange(targets.numel(), device=targets.device), targets
    rows = (targets != ignore_index).nonzero().squeeze(1)
    return rows, targets.index_select(0, rows)


def final_hidden_states(model: nn.Module, **inputs) -> tuple[torch.Tensor, nn.Linear]:
    """Run ``model``'s decoder (vision tower included) without the lm_head.

    model: a Qwen2-VL / Qwen2.5-VL ``*ForConditionalGeneration`` (patched or not); inputs: its forward
    arguments (input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, ...;
    ``labels``/``shift_labels``/``num_items_in_batch``/``logits_to_keep`` are ignored).
    Returns (hidden [B,S,Hd] after the final norm, the lm_head module). For distillation:

        rows, y = next_token_targets(batch["labels"])
        h, head = final_hidden_states(student, **batch)
        with torch.no_grad():
            th, thead = final_hidden_states(teacher, **batch)
        loss = linear_kd_loss(h.flatten(0, 1)[rows], head.weight, y, teacher_hidden=th.flatten(0, 1)[rows],
                              teacher_weight=thead.weight, temperature=..., alpha=..., beta=...)
    """
    for name in ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep", "return_logits"):
        inputs.pop(name, None)
    outputs = model.model(**inputs)
    return outputs.last_hidden_state, model.get_output_embeddings()


def _slice_to_keep(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    return hidden[:, logits_to_keep]


def lm_head_operands(hidden: torch.Tensor, head: nn.Linear):
    """(hidden, weight, bias) of ``linear_kd_loss`` for the lm_head ``head``, in one dtype, as
    ``head(hidden)`` would compute: the autocast dtype under autocast on hidden's device (fp32 master
    weights, bf16 matmuls), else the weight's dtype. bias is None when the head has none. The patched
    forward and ``ClinKDTrainer`` both build their operands here, inside the head's forward
    (``clinkd.patch.call_in_forward``); a ZeRO-3 placeholder or an FSDP2 shard is a ValueError naming the
    cause (``check_full_weight``)."""
    weight, bias = head.weight, head.bias
    check_full_weight(weight)
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = weight.dtype
    cast = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias)


def make_lm_forward(call, wrapped, *, output_class: type, backend: str | None):
    """``<P>ForConditionalGeneration.forward`` with the fused loss (see the module docstring).

    call(self, **kwargs) runs the previous forward (used without labels); ``wrapped`` gives the
    signature (kept, so ``generate()`` still sees ``position_ids`` etc.)."""
    signature = inspect.signature(wrapped)
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    fields = set(getattr(output_class, "__dataclass_fields__", {}))

    @functools.wraps(wrapped)
    def forward(self, *args, **kwargs):
        arguments = dict(signature.bind(self, *args, **kwargs).arguments)
        arguments.pop("self", None)
        inputs = {**arguments, **arguments.pop(var_kw, {})} if var_kw else arguments
        return_logits = inputs.pop("return_logits", None)
        labels = inputs.pop("labels", None)
        shift_labels = inputs.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return call(self, **inputs)

        logits_to_keep = inputs.pop("logits_to_keep", 0)
        return_dict = inputs.pop("return_dict", None)
        num_items = inputs.pop("num_items_in_batch", None)
        ignore_index = inputs.pop("ignore_index", -100)
        outputs = self.model(**inputs)
        hidden = outputs.last_hidden_state
        head = self.get_output_embeddings()

        rows, targets = next_token_targets(labels, shift_labels=shift_labels, ignore_index=ignore_index)
        rows, targets = rows.to(hidden.device), targets.to(hidden.device)
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)

        def head_loss(head, selected):  # run as the head's forward: the engine hands it the full weight
            selected, weight, bias = lm_head_operands(selected, head)
            return linear_kd_loss(
                selected,
                weight,
                targets,
                bias=bias,
                alpha=0.0,
                beta=1.0,
                ignore_index=ignore_index,
                reduction="mean" if num_items is None else "sum",
                backend=backend,
            )

        loss = call_in_forward(head, head_loss, selected)
        if num_items is not None:
            loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)

        if return_logits is None:
            return_logits = not self.training
        logits = head(_slice_to_keep(hidden, logits_to_keep)) if return_logits else None
        data = {k: v for k, v in outputs.items() if k in fields and k not in ("loss", "logits")}
        result = output_class(loss=loss, logits=logits, **data)
        if return_dict is False or (return_dict is None and not getattr(self.config, "return_dict", True)):
            return result.to_tuple()
        return result

    return forward
