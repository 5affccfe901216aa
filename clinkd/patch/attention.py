"""The text decoder's attention on ``mcg_rope_attention`` (M-RoPE rotation inside the fused kernel).

Stock transformers turns the 3-D position ids into cos/sin tensors once per forward (the rotary
embedding), rotates q and k in every layer, and masks with a 4-D mask built for the attention
backend. The fused kernel wants the raw inputs instead, so three methods are replaced:

    <P>TextModel.forward        records the caller's 2-D padding mask [B,S] for this forward
    <P>RotaryEmbedding.forward  returns MRopePositions (position ids [3,B,S], inv_freq, sections,
                                the padding mask) in place of (cos, sin); they travel to every layer
                                as ``position_embeddings``, so gradient-checkpoint recomputation
                                sees the same values
    <P>Attention.forward        q, k, v [B,S,H,D] → mcg_rope_attention → o_proj

Which path a layer takes:

* no KV cache, or an empty one (training, prefill): the fused kernel. Padded batches pass the 2-D
  mask; packed batches (no mask, text positions that restart, as transformers detects packing, or
  flash-attention ``cu_seq_lens_q``) pass cu_seqlens. With an empty cache the layer also stores
  the keys rotated by ``apply_mrope`` (and the values), detached, as the stock layer would.
* a cache that already holds tokens (decoding), a mask that is not a 2-D tensor (custom 4-D masks,
  masks prepared by ``generate`` for compiled caches), or ``output_attentions``: the stock layer,
  fed cos/sin computed on demand from the same position ids (rotation + the configured attention
  backend, SDPA by default). Attention weights are only returned on this path.
"""

from __future__ import annotations

import contextvars
import functools
import inspect

import torch

from clinkd_kernels import apply_mrope
from clinkd_kernels.attention import mcg_rope_attention

from ._compat import text_mrope_section

UNKNOWN = "unknown"  # padding-mask marker: the fused path cannot express the mask, use the stock layer
_PADDING_MASK = contextvars.ContextVar("clinkd_padding_mask", default=UNKNOWN)


class MRopePositions:
    """What the patched rotary embedding returns instead of (cos, sin).

    position_ids [3,B,S] (t, h, w), ``inv_freq`` [D/2] fp32, ``mrope_section`` (s_t, s_h, s_w) and
    ``mrope_interleaved`` (the family's frequency layout), ``attention_scaling`` (multiplies cos and
    sin), ``padding_mask`` ([B,S] tensor, None, or UNKNOWN).
    Unpacking it (``cos, sin = positions``) yields the stock cos/sin [B,S,D], computed once on demand.
    """

    def __init__(
        self, position_ids, rotary, stock_forward, padding_mask, like: torch.Tensor, *, mrope_interleaved: bool = False
    ):
        self.position_ids = position_ids
        self.mrope_interleaved = mrope_interleaved
        self.padding_mask = padding_mask
        self._rotary, self._stock_forward = rotary, stock_forward
        self._dtype, self._device = like.dtype, like.device
        self._cos_sin = None
        self._packing = None  # ((position_ids, cu_seq_lens_q, B, S), cu_seqlens) of the last layer's call

    @property
    def inv_freq(self) -> torch.Tensor:
        return self._rotary.inv_freq.float()

    @property
    def mrope_section(self) -> list[int]:
        return text_mrope_section(self._rotary)

    @property
    def attention_scaling(self) -> float:
        return float(self._rotary.attention_scaling)

    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos_sin is None:
            like = torch.empty(0, dtype=self._dtype, device=self._device)
            self._cos_sin = tuple(self._stock_forward(self._rotary, like, self.position_ids))
        return self._cos_sin

    def packed_cu_seqlens(self, position_ids, kwargs, batch: int, seqlen: int):
        """``_packed_cu_seqlens`` once per forward: every layer passes the same position ids (and
        cu_seq_lens_q), so the later layers reuse the first one's (no per-layer ``nonzero`` sync)."""
        key = (position_ids, kwargs.get("cu_seq_lens_q"), batch, seqlen)
        cached = self._packing
        if cached is None or cached[0][0] is not key[0] or cached[0][1] is not key[1] or cached[0][2:] != key[2:]:
            self._packing = cached = (key, _packed_cu_seqlens(position_ids, kwargs, batch, seqlen))
        return cached[1]

    def __iter__(self):
        return iter(self.cos_sin())

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return self.cos_sin()[i]


def _padding_mask_of(mask):
    """The caller's attention mask as the fused kernel can take it: None, a [B,S] tensor, or UNKNOWN."""
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask
    return UNKNOWN


def make_text_forward(call, wrapped):
    """``<P>TextModel.forward`` that records its attention mask for the rotary embedding to hand on."""

    @functools.wraps(wrapped)
    def forward(self, *args, **kwargs):
        mask = kwargs["attention_mask"] if "attention_mask" in kwargs else (args[1] if len(args) > 1 else None)
        padding = _padding_mask_of(mask)
        if kwargs.get("output_attentions") or getattr(self.config, "output_attentions", False):
            padding = UNKNOWN  # attention weights exist only on the stock path
        token = _PADDING_MASK.set(padding)
        try:
            return call(self, *args, **kwargs)
        finally:
            _PADDING_MASK.reset(token)

    return forward


def make_rotary_forward(stock_forward, *, mrope_interleaved: bool = False):
    """``<T>RotaryEmbedding.forward(x, position_ids [3,B,S])`` → MRopePositions (no cos/sin computed).
    Text positions ([B,S], or [1,B,S] as generate() continues a cache) are the same on rows t, h, w.
    ``mrope_interleaved``: the family's frequency layout (Qwen3-VL's rotary always interleaves)."""

    @functools.wraps(stock_forward)
    def forward(self, x, position_ids):
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0)
        if position_ids.shape[0] == 1:
            position_ids = position_ids.expand(3, -1, -1)
        return MRopePositions(
            position_ids, self, stock_forward, _PADDING_MASK.get(), x, mrope_interleaved=mrope_interleaved
        )

    return forward


def _packed_cu_seqlens(position_ids, kwargs, batch: int, seqlen: int):
    """cu_seqlens (int32 [n+1]) over the B·S flattened tokens when the batch is packed, else None.

    Packing is described as transformers does: flash-attention ``cu_seq_lens_q``, or text position ids
    [B,S] in which a sequence starts wherever the position does not follow its predecessor by 1.
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return cu.to(torch.int32)
    if position_ids is None:
        return None
    text = position_ids.expand(batch, seqlen) if position_ids.dim() == 2 else position_ids.reshape(batch, seqlen)
    starts = torch.ones(batch, seqlen, dtype=torch.bool, device=text.device)
    starts[:, 1:] = text.diff(dim=-1) != 1
    begin = starts.reshape(-1).nonzero().squeeze(1)
    end = torch.tensor([batch * seqlen], device=text.device)
    return torch.cat([begin, end]).to(torch.int32)


def make_attention_forward(call, wrapped, *, backend: str | None, cache_kw: str):
    """``<T>Attention.forward`` on the fused kernel (see the module docstring for the path rules).

    The arguments are read by the stock signature (Qwen2-VL and Qwen2.5-VL take ``hidden_states,
    attention_mask, position_ids, cache, position_embeddings``; Qwen3-VL ``hidden_states,
    position_embeddings, attention_mask, cache``), and the stock path gets them exactly as given.
    Qwen3-VL's per-head RMSNorm of q and k (``q_norm``, ``k_norm``) runs before the rotation, as in
    the stock layer. cache_kw: the name under which this transformers version passes the KV cache
    ("cache" or "past_key_values"); it also tells how ``Cache.update`` is called.
    """
    update_kwargs = cache_kw == "cache"
    signature = inspect.signature(wrapped)

    @functools.wraps(wrapped)
    def forward(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        extra = arguments.get("kwargs", {})
        positions = arguments.get("position_embeddings")
        cache = arguments.get(cache_kw, extra.get(cache_kw))
        if cache is None:
            cache = arguments.get("past_key_values" if cache_kw == "cache" else "cache", extra.get("past_key_values"))
        hidden_states = arguments["hidden_states"]
        stock = (
            not isinstance(positions, MRopePositions)
            or positions.padding_mask is UNKNOWN
            or (cache is not None and cache.get_seq_length(self.layer_idx) > 0)
        )
        if not stock and isinstance(positions.padding_mask, torch.Tensor):
            stock = positions.padding_mask.shape != hidden_states.shape[:2]
        if stock:
            return call(self, *args, **kwargs)

        batch, seqlen, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, seqlen, -1, self.head_dim)
        k = self.k_proj(hidden_states).view(batch, seqlen, -1, self.head_dim)
        v = self.v_proj(hidden_states).view(batch, seqlen, -1, self.head_dim)
        if hasattr(self, "q_norm"):  # Qwen3-VL: RMSNorm over each head's D, before the rotary
            q, k = self.q_norm(q), self.k_norm(k)
        pos, inv_freq, section = positions.position_ids, positions.inv_freq, positions.mrope_section
        layout = {"mrope_interleaved": positions.mrope_interleaved}
        scaling = positions.attention_scaling

        if cache is not None:  # prefill: the cache keeps rotated keys, as the stock layer stores them
            with torch.no_grad():
                _, k_rot = apply_mrope(
                    k, k, pos, inv_freq, section, attention_scaling=scaling, backend=backend, **layout
                )
            update = {"kwargs": extra} if update_kwargs else {}
            cache.update(k_rot.transpose(1, 2), v.detach().transpose(1, 2), self.layer_idx, **update)

        # cos and sin both scale by s, so the logits scale by s²: fold it into the softmax scale.
        scale = self.scaling * scaling * scaling
        mask = positions.padding_mask
        position_ids = arguments.get("position_ids", extra.get("position_ids"))
        cu_seqlens = None if mask is not None else positions.packed_cu_seqlens(position_ids, extra, batch, seqlen)
        common = dict(causal=True, softmax_scale=scale, backend=backend, **layout)
        if cu_seqlens is not None:  # a packed row: its sequences as one varlen batch of B·S tokens
            q, k, v = (t.reshape(batch * seqlen, t.shape[2], t.shape[3]) for t in (q, k, v))
            pos, common["cu_seqlens"] = pos.reshape(3, batch * seqlen), cu_seqlens
        else:
            common["attention_mask"] = mask
        out = mcg_rope_attention(q, k, v, pos, inv_freq, section, **common)
        return self.o_proj(out.reshape(batch, seqlen, -1)), None

    return forward
