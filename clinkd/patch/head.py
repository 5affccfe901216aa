"""The lm_head's full weight under distributed engines: run the fused loss inside the head's forward.

A fused loss reads ``lm_head.weight`` itself instead of calling ``lm_head(hidden)``. Engines that shard
parameters only hand out the full weight around the forward of the module that owns it:

* DeepSpeed ZeRO-3 keeps every parameter as an empty placeholder (``numel() == 0``) outside its
  module's forward, gathers it in a pre-forward hook and re-gathers it for that module's backward;
* FSDP2 (``fully_shard``) keeps a sharded ``DTensor`` outside the forward of the module it was applied
  to (the root's parameters stay unsharded from its forward until the backward);
* DDP, ZeRO-1/2 and a single process keep the full weight everywhere.

``call_in_forward(head, fn, *args)`` runs ``fn(head, *args)`` *as* ``head``'s forward (the forward is
swapped for the call, the module is called, so every hook of the engine runs around ``fn``): inside,
``head.weight`` is the full weight, and the gradient of whatever ``fn`` returns flows back through the
engine's hooks — the same redirection Trainer-side fused losses use elsewhere (no copy of the weight
the engine already holds). Without an engine it costs one Python call.

``check_full_weight(weight, name)`` is the guard every fused-head path runs first: a placeholder or a
shard is a ValueError naming the cause, instead of a shape error deep inside a kernel.
"""

from __future__ import annotations

from torch import nn


def call_in_forward(module: nn.Module, fn, *args, **kwargs):
    """``fn(module, *args, **kwargs)`` run as ``module``'s forward (module docstring)."""
    had_own = "forward" in module.__dict__
    own = module.__dict__.get("forward")

    def forward(*a, **k):
        return fn(module, *a, **k)

    module.forward = forward
    try:
        return module(*args, **kwargs)
    finally:
        if had_own:
            module.forward = own
        else:
            del module.forward


def check_full_weight(weight, name: str = "lm_head.weight") -> None:
    """ValueError when ``weight`` is not the full tensor: a ZeRO-3 placeholder or an FSDP2 shard."""
    if type(weight).__name__ == "DTensor":
        raise ValueError(
            f"{name} is a sharded DTensor (FSDP2) of local shape {list(weight.to_local().shape)}: the "
            "fused loss needs the full weight; call it inside the head's forward "
            "(clinkd.patch.call_in_forward) or shard the head as part of the root module"
        )
    if weight.numel() == 0:
        status = getattr(weight, "ds_status", None)
        cause = f" (DeepSpeed status {status})" if status is not None else ""
        raise ValueError(
            f"{name} has 0 elements{cause}: it is a partitioned parameter (DeepSpeed ZeRO-3 keeps an "
            "empty placeholder outside its module's forward); the fused loss must run inside the "
            "head's forward (clinkd.patch.call_in_forward) or under deepspeed.zero.GatheredParameters"
        )
