"""A Qwen2-VL processor built on this machine, with no hub access: for tests, the demo and tiny runs.

    processor = build_offline_processor(texts, vocab_size=512, patch_size=4, min_pixels=16 * 16,
                                        max_pixels=32 * 32)
    processor.save_pretrained(folder)        # later: AutoProcessor.from_pretrained(folder)

Tokenizer: byte-level BPE trained on ``texts`` with the ``tokenizers`` library (any text stays
encodable, byte fallback), plus Qwen2-VL's special tokens, wrapped as a ``PreTrainedTokenizerFast``
with a ChatML chat template that renders messages the way Qwen2-VL's own template does (system
turn, ``<|im_start|>role\\n…<|im_end|>\\n``, images as ``<|vision_start|><|image_pad|><|vision_end|>``).
Image processor: transformers' Qwen2-VL image processor at a small pixel budget, so a picture
becomes a handful of placeholder tokens. Real runs use ``AutoProcessor.from_pretrained(model path)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

# Qwen2-VL's special tokens, in its order: the first is the padding / end-of-text token.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# ChatML as Qwen2-VL writes it. A message's content is a string or a list of parts
# ({"type": "image"}, {"type": "video"}, {"type": "text", "text": ...}); a system turn is added when
# the conversation has none.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_offline_tokenizer(texts: Iterable[str], *, vocab_size: int = 512, min_frequency: int = 2):
    """Byte-level BPE trained on ``texts`` + Qwen2-VL special tokens → ``PreTrainedTokenizerFast``.

    The trained vocabulary has at most ``vocab_size`` entries (256 bytes + merges + the special
    tokens); ``len(tokenizer)`` is the size a model's embedding needs. Training is deterministic
    for the same texts in the same order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("texts must hold at least one string to train the tokenizer on")
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be an int >= {256 + len(SPECIAL_TOKENS)} (bytes + special tokens), got {vocab_size!r}"
        )
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, model_max_length=32768
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_offline_image_processor(
    *,
    patch_size: int = 4,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_pixels: int = 16 * 16,
    max_pixels: int = 32 * 32,
):
    """Qwen2-VL image processor at a small budget: an image becomes (h/p)·(w/p)/merge² placeholder
    tokens, with h·w resized into [min_pixels, max_pixels] and h, w multiples of patch_size·merge_size."""
    try:  # the PIL implementation needs no torchvision
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as Cls
    except ImportError:  # older transformers
        from transformers import Qwen2VLImageProcessor as Cls
    factor = patch_size * merge_size
    if min_pixels < factor * factor or max_pixels < min_pixels:
        raise ValueError(
            f"need (patch_size·merge_size)² = {factor * factor} <= min_pixels <= max_pixels, got "
            f"min_pixels={min_pixels}, max_pixels={max_pixels}"
        )
    return Cls(
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )


def build_offline_processor(
    texts: Iterable[str],
    *,
    vocab_size: int = 512,
    min_frequency: int = 2,
    patch_size: int = 4,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_pixels: int = 16 * 16,
    max_pixels: int = 32 * 32,
):
    """Tokenizer (``build_offline_tokenizer``) + image processor (``build_offline_image_processor``)
    → ``Qwen2VLProcessor`` (no video processor). Match the model's vision config: ``patch_size``,
    ``spatial_merge_size`` = merge_size, ``temporal_patch_size``."""
    tokenizer = build_offline_tokenizer(texts, vocab_size=vocab_size, min_frequency=min_frequency)
    image_processor = build_offline_image_processor(
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )
    return ImageTextQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


class ImageTextQwen2VLProcessor(Qwen2VLProcessor):
    """A ``Qwen2VLProcessor`` for images and text only.

    The stock class insists on a video processor, which needs torchvision; this subclass has none
    (a call with videos raises). It saves and loads like any processor (``load_processor`` picks it).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError("this processor handles images and text only (no video processor)")
        return super().__call__(images=images, text=text, **kwargs)


def load_processor(path: str):
    """A saved processor: ``AutoProcessor.from_pretrained(path)``, or the images-and-text class above
    when ``path`` holds one that ``build_offline_processor`` saved."""
    import json
    import os

    config = os.path.join(path, "processor_config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            if json.load(f).get("processor_class") == "ImageTextQwen2VLProcessor":
                return ImageTextQwen2VLProcessor.from_pretrained(path)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def special_token_ids(tokenizer) -> dict[str, int]:
    """{"image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "pad_token_id",
    "eos_token_id"} of a Qwen2-VL tokenizer: the ids a model config must agree with."""
    ids = {}
    for key, token in (
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
        ("pad_token_id", tokenizer.pad_token or "<|endoftext|>"),
        ("eos_token_id", "<|im_end|>"),
    ):
        value = tokenizer.convert_tokens_to_ids(token)
        if value is None or (tokenizer.unk_token_id is not None and value == tokenizer.unk_token_id):
            raise ValueError(f"tokenizer has no {token} token (Qwen2-VL special tokens are required)")
        ids[key] = int(value)
    return ids


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the tokenizer's (token, id) pairs, added tokens included: two tokenizers with the
    same fingerprint map every text to the same ids. Independent of file layout and serialisation."""
    h = hashlib.sha256()
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0])):
        h.update(f"{index}\t{token}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()
