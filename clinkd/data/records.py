"""Med-GRIT-style records: reading, checking and normalising them (the data format of docs/method.md).

A record is one image and a conversation about it:

    {"id": "ct_00123_liver", "task": "VG",                       # task optional (inferred), image optional
     "conversations": [{"from": "human", "value": "<img>ct_00123_liver.png</img> Where is the liver?"},
                       {"from": "gpt", "value": "<box>(0.21,0.30),(0.55,0.62)</box>"}]}

Accepted forms:
* ``conversations``: a list of ``{"from": "human"|"user"|"gpt"|"assistant"|"system", "value": ...}`` turns
  (ShareGPT; ``role``/``content`` keys too) or a list of ``[question, answer]`` pairs (Med-GRIT test files).
* modality: the ``id`` prefix before the first underscore (lower-cased), or a ``modality`` field; it
  must be one of MODALITIES.
* image: ``image`` (or a one-element ``images``) relative to the data root, else ``<id>.png``; the
  resolved path must stay inside the data root.
* boxes: ``<box>(x1,y1),(x2,y2)</box>``, ``<box_start>…<box_end>`` or ``<|box_start|>…<|box_end|>`` with
  corners in [0, 1], x1 <= x2 and y1 <= y2; all are rewritten to Qwen2-VL's
  ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` (the numbers are kept as written). A box outside [0, 1], a box
  with inverted corners, a box tag without two corners, or a box tag that is not closed, is an error.
* text: every string must be valid Unicode (no lone surrogates) and hold none of the chat template's
  control tokens (``<|im_start|>``, ``<|im_end|>``, ``<|image_pad|>``, ...), which would break the turns.
* ``<img>…</img>`` and ``<image>`` in a question are removed: the image goes before the first question.
* task: ``task`` field (VG, ROC, RC, MIA; any case) or inferred — answer has a box and the question
  none: VG; question has a box and the answer none: ROC when the answer has at most three words,
  else RC; no box anywhere: MIA; anything else needs a ``task`` field.

Every check is made by ``load_records`` (one place, for every command that reads records); its errors
are DataError naming ``file:line`` (JSON lines) or ``file[index]`` (a JSON list) and the record id.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path

from .paths import file_problem

TASKS = ("VG", "ROC", "RC", "MIA")
MODALITIES = ("ct", "mr", "x", "pet", "endoscopy", "dermoscopy", "fundus", "ultrasound")

_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")
_NUM = r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*"
_CORNERS = re.compile(r"\s*\(" + _NUM + "," + _NUM + r"\)\s*,\s*\(" + _NUM + "," + _NUM + r"\)\s*")
_BOX = re.compile(r"<box>(.*?)</box>|<\|?box_start\|?>(.*?)<\|?box_end\|?>", re.S)
_IMG_TAG = re.compile(r"<img>.*?</img>|<image>", re.S)
_BOX_TAG = re.compile(r"</?box>|<\|?box_(?:start|end)\|?>")  # any box tag, paired or not
# chat template control tokens: in a record's text they would open or close turns, or add image placeholders
CONTROL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3


def show(value) -> str:
    """A short repr of a user value for an error message (long strings and deep structures cut)."""
    return _REPR.repr(value)


def short_path(path) -> str:
    """``path`` for an error message: as it is, or its two ends when it is very long."""
    text = str(path)
    return text if len(text) <= 160 else f"{text[:70]}...{text[-70:]}"


class DataError(ValueError):
    """A record (or data file) that cannot be used; the message names the file, the record and why."""


@dataclass(frozen=True)
class Record:
    """One normalised sample.

    id: the sample id (unique in a data set); modality: lower-case id prefix; task: one of TASKS;
    image: absolute path inside the data root; system: a system prompt or None (the template's);
    turns: ((question, answer), ...) with boxes in Qwen2-VL form and image tags removed;
    where: "file:line" (JSONL) or "file[index]" (JSON) for error messages.
    """

    id: str
    modality: str
    task: str
    image: Path
    turns: tuple[tuple[str, str], ...]
    system: str | None = None
    where: str = ""

    def messages(self, *, with_answers: bool = True) -> list[dict]:
        """Chat messages for ``apply_chat_template``: the image goes in the first user turn."""
        out = [] if self.system is None else [{"role": "system", "content": self.system}]
        for i, (question, answer) in enumerate(self.turns):
            content = [{"type": "image"}, {"type": "text", "text": question}] if i == 0 else question
            out.append({"role": "user", "content": content})
            if with_answers:
                out.append({"role": "assistant", "content": answer})
        return out


def _corners(match: re.Match) -> tuple[str, str, str, str]:
    """The four numbers of a matched box tag, as written; DataError when the tag holds no two corners, a
    corner outside [0, 1] or inverted corners (x1 > x2 or y1 > y2)."""
    inner = match.group(1) if match.group(1) is not None else match.group(2)
    corners = _CORNERS.fullmatch(inner)
    if corners is None:
        raise DataError(f"box {show(match.group(0))} is not of the form (x1,y1),(x2,y2)")
    values = corners.groups()
    bad = [v for v in values if not 0.0 <= float(v) <= 1.0]
    if bad:
        raise DataError(
            f"box {show(match.group(0))} has corners outside [0, 1] ({', '.join(bad)}); "
            "boxes must be normalised by the image width and height"
        )
    x1, y1, x2, y2 = (float(v) for v in values)
    if x1 > x2 or y1 > y2:
        raise DataError(
            f"box {show(match.group(0))} has inverted corners ({'x1 > x2' if x1 > x2 else 'y1 > y2'}); "
            "write the top-left corner first: (x1,y1),(x2,y2) with x1 <= x2, y1 <= y2"
        )
    return values


def _check_box_tags(text: str) -> None:
    """DataError for a box tag left over once the complete boxes are taken out (an unclosed ``<box>``,
    a stray ``</box>`` or ``<|box_end|>``)."""
    stray = _BOX_TAG.search(_BOX.sub(" ", text))
    if stray is not None:
        raise DataError(
            f"box tag {stray.group(0)!r} is not closed or not opened (near "
            f"{show(text[max(0, stray.start() - 20) : stray.end() + 20])})"
        )


def parse_boxes(text: str) -> list[tuple[float, float, float, float]]:
    """Boxes written in ``text`` in any of the tagged forms, as (x1, y1, x2, y2) floats. DataError for a
    tag whose content is not two corners in [0, 1] with x1 <= x2 and y1 <= y2, or an unclosed tag."""
    _check_box_tags(text)
    return [tuple(float(v) for v in _corners(match)) for match in _BOX.finditer(text)]


def normalise_boxes(text: str) -> str:
    """Rewrite every tagged box to ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``; DataError when a box is
    malformed, has a corner outside [0, 1] (Med-GRIT corners are normalised by the image size) or
    inverted corners, or when a box tag is not closed."""
    _check_box_tags(text)
    return _BOX.sub(lambda match: "<|box_start|>({},{}),({},{})<|box_end|>".format(*_corners(match)), text)


def infer_task(question: str, answer: str) -> str | None:
    """The task a (question, answer) pair looks like (rules in the module docstring), or None."""
    q_box, a_box = bool(_BOX.search(question)), bool(_BOX.search(answer))
    if a_box and not q_box:
        return "VG"
    if q_box and not a_box:
        return "ROC" if len(answer.split()) <= 3 else "RC"
    if not q_box and not a_box:
        return "MIA"
    return None


def _text(value: str, where: str, what: str) -> str:
    """``value`` when it is valid Unicode without chat control tokens; else DataError naming ``what``."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{where}: {what} holds {value[e.start]!r}, which is not a Unicode character "
            "(a lone surrogate escape in the JSON)"
        ) from None
    for token in CONTROL_TOKENS:
        if token in value:
            raise DataError(
                f"{where}: {what} holds the chat template's control token {token}; records hold "
                "plain text (the template adds the turn and image tokens)"
            )
    return value


def _turns(conversations, where: str) -> tuple[str | None, list[tuple[str, str]]]:
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    if all(isinstance(t, (list, tuple)) for t in conversations):  # [question, answer] pairs
        pairs = []
        for i, pair in enumerate(conversations):
            if len(pair) != 2 or not all(isinstance(x, str) for x in pair):
                raise DataError(f"{where}: conversations[{i}] must be a [question, answer] pair of strings")
            pairs.append(
                (_text(pair[0], where, f"conversations[{i}][0]"), _text(pair[1], where, f"conversations[{i}][1]"))
            )
        return None, pairs
    system, pairs, question = None, [], None
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise DataError(
                f"{where}: conversations[{i}] must be a {{'from', 'value'}} turn or a [question, answer] "
                f"pair, got {type(turn).__name__}"
            )
        role = turn.get("from", turn.get("role", ""))
        if not isinstance(role, str):
            raise DataError(f"{where}: conversations[{i}] 'from' must be a string, got {show(role)}")
        role = role.lower()
        value = turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            raise DataError(f"{where}: conversations[{i}] has no text 'value'")
        value = _text(value, where, f"conversations[{i}]")
        if role == "system" and i == 0:
            system = value
        elif role in _HUMAN and question is None:
            question = value
        elif role in _GPT and question is not None:
            pairs.append((question, value))
            question = None
        else:
            raise DataError(
                f"{where}: conversations[{i}] from {show(role)} breaks the human/gpt alternation "
                "(turns must be human, gpt, human, gpt, ...)"
            )
    if question is not None:
        raise DataError(f"{where}: the last human turn has no gpt answer")
    if not pairs:
        raise DataError(f"{where}: 'conversations' holds no human/gpt pair")
    return system, pairs


def _image_path(raw: dict, record_id: str, root: Path, where: str) -> Path:
    image = raw.get("image")
    if image is None and isinstance(raw.get("images"), list):
        if len(raw["images"]) != 1:
            raise DataError(f"{where}: exactly one image per record is supported, got {len(raw['images'])}")
        image = raw["images"][0]
    if image is None:
        image = f"{record_id}.png"
    if not isinstance(image, str) or not image:
        raise DataError(f"{where}: 'image' must be a path string")
    _text(image, where, "the image path")
    if "\0" in image:
        raise DataError(f"{where}: image path {show(image)} holds a NUL character")
    try:
        path = (root / image).resolve()
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: image path {show(image)} cannot be resolved ({e})") from None
    if not path.is_relative_to(root):
        raise DataError(
            f"{where}: image {show(image)} resolves to {short_path(path)}, outside the data root {short_path(root)}"
        )
    return path


def parse_record(raw: dict, *, root: str | os.PathLike, where: str = "") -> Record:
    """One raw record (a dict from the data file) → Record, or DataError naming ``where`` and the problem."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    record_id = raw.get("id")
    if not isinstance(record_id, str) or not record_id:
        raise DataError(f"{where}: record has no string 'id'")
    _text(record_id, where, "the id")
    where = f"{where} (id {show(record_id)})"
    modality = raw.get("modality", record_id.split("_", 1)[0])
    if not isinstance(modality, str) or not modality:
        raise DataError(f"{where}: 'modality' must be a non-empty string")
    modality = check_modality(modality, where)
    system, pairs = _turns(raw.get("conversations"), where)
    turns = []
    try:
        for question, answer in pairs:
            turns.append((_IMG_TAG.sub("", normalise_boxes(question)).strip(), normalise_boxes(answer).strip()))
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    task = raw.get("task")
    if task is None:
        task = infer_task(pairs[0][0], pairs[0][1])
        if task is None:
            raise DataError(
                f"{where}: cannot infer the task (boxes in both question and answer); add a 'task' "
                f"field, one of {', '.join(TASKS)}"
            )
    elif not isinstance(task, str) or task.upper() not in TASKS:
        raise DataError(f"{where}: unknown task {show(task)}; expected one of {', '.join(TASKS)}")
    image = _image_path(raw, record_id, Path(root).resolve(), where)
    return Record(
        id=record_id, modality=modality, task=task.upper(), image=image, turns=tuple(turns), system=system, where=where
    )


def check_modality(modality, where: str) -> str:
    """``modality`` lower-cased when it is one of MODALITIES; else DataError located at ``where``."""
    if not isinstance(modality, str) or modality.lower() not in MODALITIES:
        raise DataError(
            f"{where}: unknown modality {show(modality)}; expected one of {', '.join(MODALITIES)} "
            "(the id prefix before the first underscore, or a 'modality' field)"
        )
    return modality.lower()


def read_text(path: str | os.PathLike, what: str = "data file") -> str:
    """The UTF-8 text of a regular file (a leading byte-order mark dropped); DataError naming the file
    (and ``file:line`` for bytes that are not UTF-8) otherwise."""
    problem = file_problem(path)
    if problem is not None:
        raise DataError(f"{what} {path} {problem}")
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); save the file as UTF-8"
        ) from None


def _deepest_line(text: str) -> tuple[int, int]:
    """(nesting depth, line) of the first place where JSON ``text`` is nested deepest (strings skipped)."""
    depth = best = 0
    line = best_line = 1
    in_string = escaped = False
    for char in text:
        if char == "\n":
            line += 1
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > best:
                best, best_line = depth, line
        elif char in "]}":
            depth -= 1
    return best, best_line


def _json(text: str, where: str):
    """json.loads with every failure as DataError at ``where`` (bad syntax, nesting too deep, an integer
    too long to convert)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested {_deepest_line(text)[0]} levels deep, too deep to read") from None
    except ValueError as e:  # e.g. an integer literal over Python's digit limit
        raise DataError(f"{where}: not valid JSON ({e})") from None


def parse_jsonl(text: str, path) -> list[tuple[object, str]]:
    """(value, "file:line") for each non-blank line of JSON-lines ``text`` read from ``path``;
    DataError naming the line for one that is not valid JSON. Lines end at "\\n" only (a U+2028 inside
    a JSON string is text, as JSON says)."""
    out = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        out.append((_json(line, f"{path}:{number}"), f"{path}:{number}"))
    return out


def read_raw_records(path: str | os.PathLike) -> list[tuple[dict, str]]:
    """The raw records of a ``.json`` (a list of records) or ``.jsonl`` (one per line) file, each with
    its location ("file[index]" or "file:line") for error messages."""
    path = Path(path)
    text = read_text(path)
    if path.suffix == ".jsonl" or (path.suffix != ".json" and not text.lstrip().startswith("[")):
        return parse_jsonl(text, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        depth, line = _deepest_line(text)
        raise DataError(f"{path}:{line}: JSON nested {depth} levels deep, too deep to read") from None
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of records")
    return [(raw, f"{path}[{i}]") for i, raw in enumerate(data)]


def load_records(
    path: str | os.PathLike, *, root: str | os.PathLike | None = None, check_images: bool = True
) -> list[Record]:
    """Read, check and normalise every record of a data file (root: the image folder, default the file's
    folder). Every command that reads records reads them here, so every check is made in one place.

    Raises DataError for the first bad record (unknown task or modality, a malformed, inverted or
    out-of-range box, an unclosed box tag, an image outside the root, a malformed conversation), an
    image that is missing or not a regular file (``check_images``; only looked at, never opened), or a
    duplicated id."""
    root = Path(root if root is not None else Path(path).parent)
    try:
        root_is_folder = root.is_dir()
    except (OSError, ValueError):
        root_is_folder = False
    if not root_is_folder:
        raise DataError(f"data root {root} is not a folder")
    records, seen = [], {}
    for raw, where in read_raw_records(path):
        record = parse_record(raw, root=root, where=where)
        if record.id in seen:
            raise DataError(f"{where}: id {show(record.id)} repeats the record at {seen[record.id]}")
        seen[record.id] = where
        if check_images:
            problem = file_problem(record.image)
            if problem is not None:
                raise DataError(f"{record.where}: image {short_path(record.image)} {problem}")
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records")
    return records
