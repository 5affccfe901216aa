"""Record → model inputs: the chat template, image placeholders and label masking.

    encoder = SampleEncoder(processor, max_length=2048)
    sample = encoder.encode(record)
    # input_ids [L], labels [L], pixel_values [P, C·t·p²], image_grid_thw [1, 3]

The conversation is rendered with the processor's chat template. The characters of each answer
(plus the ``<|im_end|>`` closing it) are found by rendering the conversation up to each question with
the generation prompt (the prefix) and up to its answer: the answer spans from the end of the prefix
to the end of the following ``<|im_end|>``. Tokens that start inside an answer span are supervised
(labels = input ids); every other token (system, questions, role headers, image placeholders) gets
``ignore_index``. Labels are not shifted (Hugging Face convention: the loss shifts).
The single ``<|image_pad|>`` the template writes is expanded to t·h·w / merge² placeholders, the
number of vision features the model's vision tower produces for the image's grid.
"""

from __future__ import annotations

import struct
import warnings
import zlib

import torch

from .paths import file_problem
from .records import DataError, Record, short_path

# What a damaged or hostile image file makes PIL raise while opening or decoding it (besides
# DecompressionBombError, imported with PIL): each becomes a DataError naming the record.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error)

IMAGE_PAD = "<|image_pad|>"
END_OF_TURN = "<|im_end|>"


class SampleEncoder:
    """Turns Records into unpadded tensors with a Qwen2-VL processor (tokenizer + image processor).

    max_length: longest sequence kept (tokens past it are cut; cutting into the image placeholders,
    or leaving no supervised token, is a DataError). ignore_index: the label of unsupervised tokens.
    """

    def __init__(self, processor, *, max_length: int = 2048, ignore_index: int = -100):
        if not isinstance(max_length, int) or max_length < 8:
            raise ValueError(f"max_length must be an int >= 8, got {max_length!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.max_length = max_length
        self.ignore_index = ignore_index
        self.merge_size = int(getattr(self.image_processor, "merge_size", 2))
        self.image_token_id = self._token_id(IMAGE_PAD)
        self.end_of_turn_id = self._token_id(END_OF_TURN)

    def _token_id(self, token: str) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the tokenizer must hold {token} as one special token (Qwen2-VL's); it encodes to {ids}")
        return ids[0]

    # ------------------------------------------------------------------ text

    def _render(self, messages, *, generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def render(self, record: Record) -> tuple[str, list[tuple[int, int]]]:
        """(chat text with one image placeholder, [(start, end) character span of each answer + <|im_end|>])."""
        messages = record.messages()
        text = self._render(messages, generation_prompt=False)
        spans, upto = [], 1 if record.system is None else 2  # messages up to and including question i
        for _ in record.turns:
            prefix = self._render(messages[:upto], generation_prompt=True)
            closed = self._render(messages[: upto + 1], generation_prompt=False)
            if not (closed.startswith(prefix) and text.startswith(closed)):
                raise ValueError(
                    "the chat template does not render conversations prefix by prefix; "
                    "cannot locate the answers to supervise"
                )
            end = closed.find(END_OF_TURN, len(prefix))
            if end < 0:
                raise ValueError(f"the chat template does not close an assistant turn with {END_OF_TURN}")
            spans.append((len(prefix), end + len(END_OF_TURN)))
            upto += 2
        return text, spans

    def image_tokens(self, grid_thw) -> int:
        """Placeholder tokens of an image with grid (t, h, w) in patches: t·h·w / merge²."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // (self.merge_size**2)

    def image_tokens_for_size(self, width: int, height: int) -> int:
        """Placeholder tokens of a width×height image after the processor's resize (no pixels read);
        ValueError for a size the processor refuses (e.g. an aspect ratio over 200)."""
        patches = self.image_processor.get_number_of_image_patches(height, width, {})
        return int(patches) // (self.merge_size**2)

    def encode_text(self, record: Record, image_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids int64 [L], labels int64 [L]) with ``image_tokens`` placeholders, truncated to max_length."""
        text, spans = self.render(record)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        pads = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(pads) != 1:
            raise DataError(
                f"{record.where}: the rendered conversation holds {len(pads)} image placeholders, "
                "expected 1 (remove image tags from the text)"
            )
        supervised = [any(a <= start < b for a, b in spans) for start, _ in offsets]
        at = pads[0]
        ids = ids[:at] + [self.image_token_id] * image_tokens + ids[at + 1 :]
        supervised = supervised[:at] + [False] * image_tokens + supervised[at + 1 :]
        if len(ids) > self.max_length:
            if at + image_tokens > self.max_length:
                raise DataError(
                    f"{record.where}: max_length {self.max_length} cuts into the image's {image_tokens} "
                    f"placeholder tokens (they end at token {at + image_tokens})"
                )
            ids, supervised = ids[: self.max_length], supervised[: self.max_length]
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = input_ids.masked_fill(~torch.tensor(supervised, dtype=torch.bool), self.ignore_index)
        if not bool((labels[1:] != self.ignore_index).any()):
            raise DataError(
                f"{record.where}: no supervised (answer) token left after truncation to "
                f"max_length={self.max_length} ({len(ids)} tokens kept)"
            )
        return input_ids, labels

    # ------------------------------------------------------------------ images

    @staticmethod
    def _read_image(record: Record, *, decode: bool):
        """(width, height) from the header, or the decoded RGB image (``decode``). DataError naming the
        record for a path that is not a regular file (a FIFO is never opened), a file PIL cannot read, or
        one with more pixels than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``; its
        warning counts as the error)."""
        from PIL import Image

        problem = file_problem(record.image)
        if problem is not None:
            raise DataError(f"{record.where}: image {short_path(record.image)} {problem}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(record.image) as image:
                    return image.convert("RGB") if decode else image.size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DataError(
                f"{record.where}: image {short_path(record.image)} is too large to decode safely ({e})"
            ) from None
        except IMAGE_ERRORS as e:
            raise DataError(f"{record.where}: image {short_path(record.image)} cannot be read ({e})") from None

    def load_image(self, record: Record):
        """The record's image, decoded to RGB (DataError when it cannot be: see ``_read_image``)."""
        return self._read_image(record, decode=True)

    def image_size(self, record: Record) -> tuple[int, int]:
        """(width, height) from the file header, without decoding the pixels."""
        return self._read_image(record, decode=False)

    def _vision(self, record: Record) -> dict:
        """The image processor's pixel_values and image_grid_thw of the record's image."""
        image = self.load_image(record)
        try:
            return self.image_processor(images=[image], return_tensors="pt")
        except ValueError as e:  # e.g. an aspect ratio the Qwen2-VL resize refuses
            raise DataError(
                f"{record.where}: image {short_path(record.image)} ({image.width}×{image.height}) cannot be "
                f"processed: {e}"
            ) from None

    def encode(self, record: Record) -> dict:
        """input_ids [L], labels [L], pixel_values [P, D], image_grid_thw [1, 3] (all unpadded)."""
        vision = self._vision(record)
        grid = vision["image_grid_thw"]
        input_ids, labels = self.encode_text(record, self.image_tokens(grid[0]))
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": grid,
        }

    def encode_prompt(self, record: Record, turn: int = 0) -> dict:
        """Generation input for question ``turn``, after the earlier turns' reference answers (teacher
        forcing): input_ids [L] ending with the assistant header, pixel_values, image_grid_thw (for
        ``model.generate``; the answer is what the model writes)."""
        if not 0 <= turn < len(record.turns):
            raise ValueError(f"{record.where}: turn {turn} is out of range; the record has {len(record.turns)} turns")
        vision = self._vision(record)
        first = 0 if record.system is None else 1
        text = self._render(record.messages()[: first + 2 * turn + 1], generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids.count(self.image_token_id) != 1:
            raise DataError(f"{record.where}: the prompt holds {ids.count(self.image_token_id)} image placeholders")
        at = ids.index(self.image_token_id)
        ids = ids[:at] + [self.image_token_id] * self.image_tokens(vision["image_grid_thw"][0]) + ids[at + 1 :]
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": vision["image_grid_thw"],
        }

    def check(self, record: Record) -> int:
        """Everything ``encode`` would reject, without decoding pixels; returns the sequence length."""
        width, height = self.image_size(record)
        try:
            tokens = self.image_tokens_for_size(width, height)
        except ValueError as e:
            raise DataError(
                f"{record.where}: image {short_path(record.image)} ({width}×{height}) cannot be processed: {e}"
            ) from None
        input_ids, _ = self.encode_text(record, tokens)
        return int(input_ids.numel())
