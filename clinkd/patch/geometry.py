"""The geometry of a Qwen-VL model as its config gives it, read in one place for the patch
(``check_patchable``), the trainer's config checks (``clinkd.train.checks``) and, through
``clinkd_kernels.rope.check_mrope_section``, the kernels' own checks.

    text decoder   head_dim D = config.head_dim, else hidden_size / num_attention_heads
                   rotary sections (s_t, s_h, s_w), s_t + s_h + s_w = D/2: rope_parameters (rope_scaling in
                   older configs) ["mrope_section"], else the family's default; interleaved (Qwen3-VL) or
                   contiguous (Qwen2-VL, Qwen2.5-VL) frequency layout
    vision tower   width / num_heads = the tower's head_dim; the width is embed_dim in Qwen2-VL's config
                   (whose hidden_size is the merger's output) and hidden_size in Qwen2.5-VL's and
                   Qwen3-VL's (whose merger writes out_hidden_size)

The rule the sections must follow is written once, in ``check_mrope_section``: this module only finds the
values in a config.
"""

from __future__ import annotations

from clinkd_kernels.rope import check_mrope_section


def text_head_dim(text_config) -> int:
    """D of the text decoder's attention heads: the config's head_dim, else hidden_size // heads."""
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def rope_parameters(text_config) -> dict:
    """The text config's rotary parameters (``rope_parameters``; ``rope_scaling`` in older configs)."""
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    return dict(rope) if isinstance(rope, dict) else {}


def mrope_section(text_config, default=None):
    """The config's (s_t, s_h, s_w) as written (unchecked), or ``default`` when it gives none."""
    return rope_parameters(text_config).get("mrope_section", default)


def mrope_section_problem(section, head_dim: int, interleaved: bool) -> str | None:
    """Why ``section`` cannot be the rotary sections of heads of ``head_dim`` in this frequency layout
    (``check_mrope_section``'s message), or None when it can."""
    try:
        check_mrope_section(section, head_dim // 2, interleaved)
    except (TypeError, ValueError) as err:
        return str(err)
    return None


def vision_width(vision_config) -> tuple[str, int | None]:
    """(key, value) of the vision tower's width in its config: ``embed_dim`` in Qwen2-VL's (where
    hidden_size is the merger's output), ``hidden_size`` where the config has ``out_hidden_size``."""
    key = "hidden_size" if hasattr(vision_config, "out_hidden_size") else "embed_dim"
    return key, getattr(vision_config, key, None)


def merger_output(vision_config) -> tuple[str, int | None]:
    """(key, value) of the width the vision merger writes into the text embedding."""
    key = "out_hidden_size" if hasattr(vision_config, "out_hidden_size") else "hidden_size"
    return key, getattr(vision_config, key, None)
