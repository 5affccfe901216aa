"""Med-GRIT-style records: reading, checking and normalising them (the data format of docs/method.md).

A record is one image and a conversation about it:

    {"id": "ct_00123_liver", "task": "VG",                       # task optional (inferred), image optional
     "conversations": [{"from": "human", "value": "<img>ct_00123_liver.png</img> Where is the liver?"},
                       {"from": "gpt", "value": "<box>(0.21,0.30),(0.55,0.62)</box>"}]}

Accepted forms:
* ``conversations``: a list of ``{"from": "human"|"user"|"gpt"|"assistant"|"system", "value": ...}`` turns
  (ShareGPT; ``role``/``content`` keys too) or a list of ``[question, answer]`` pairs (Med-GRIT test files).
* modality: the ``id`` prefix before the first underscore (lower-cased), or a ``modality`` field.
* image: ``image`` (or a one-element ``images``) relative to the data root, else ``<id>.png``; the
  resolved path must stay inside the data root.
* boxes: ``<box>(x1,y1),(x2,y2)</box>``, ``<box_start>…<box_end>`` or ``<|box_start|>…<|box_end|>`` with
  corners in [0, 1]; all are rewritten to Qwen2-VL's ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` (the numbers
  are kept as written). A box outside [0, 1], or a box tag without two corners, is an error.
* ``<img>…</img>`` and ``<image>`` in a question are removed: the image goes before the first question.
* task: ``task`` field (VG, ROC, RC, MIA; any case) or inferred — answer has a box and the question
  none: VG; question has a box and the answer none: ROC when the answer has at most three words,
  else RC; no box anywhere: MIA; anything else needs a ``task`` field.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

TASKS = ("VG", "ROC", "RC", "MIA")
MODALITIES = ("ct", "mr", "x", "pet", "endoscopy", "dermoscopy", "fundus", "ultrasound")

_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")
_NUM = r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*"
_CORNERS = re.compile(r"\s*\(" + _NUM + "," + _NUM + r"\)\s*,\s*\(" + _NUM + "," + _NUM + r"\)\s*")
_BOX = re.compile(r"<box>(.*?)</box>|<\|?box_start\|?>(.*?)<\|?box_end\|?>", re.S)
_IMG_TAG = re.compile(r"<img>.*?</img>|<image>", re.S)


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


def parse_boxes(text: str) -> list[tuple[float, float, float, float]]:
    """Boxes written in ``text`` in any of the tagged forms, as (x1, y1, x2, y2) floats.
    A tag whose content is not two corners raises DataError."""
    boxes = []
    for match in _BOX.finditer(text):
        inner = match.group(1) if match.group(1) is not None else match.group(2)
        corners = _CORNERS.fullmatch(inner)
        if corners is None:
            raise DataError(f"box {match.group(0)!r} is not of the form (x1,y1),(x2,y2)")
        boxes.append(tuple(float(v) for v in corners.groups()))
    return boxes


def normalise_boxes(text: str) -> str:
    """Rewrite every tagged box to ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``; DataError when a box is
    malformed or has a corner outside [0, 1] (Med-GRIT corners are normalised by the image size)."""

    def rewrite(match):
        inner = match.group(1) if match.group(1) is not None else match.group(2)
        corners = _CORNERS.fullmatch(inner)
        if corners is None:
            raise DataError(f"box {match.group(0)!r} is not of the form (x1,y1),(x2,y2)")
        values = corners.groups()
        bad = [v for v in values if not 0.0 <= float(v) <= 1.0]
        if bad:
            raise DataError(f"box {match.group(0)!r} has corners outside [0, 1] ({', '.join(bad)}); "
                            "boxes must be normalised by the image width and height")
        return "<|box_start|>({},{}),({},{})<|box_end|>".format(*values)

    return _BOX.sub(rewrite, text)


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


def _turns(conversations, where: str) -> tuple[str | None, list[tuple[str, str]]]:
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    if all(isinstance(t, (list, tuple)) for t in conversations):  # [question, answer] pairs
        pairs = []
        for i, pair in enumerate(conversations):
            if len(pair) != 2 or not all(isinstance(x, str) for x in pair):
                raise DataError(f"{where}: conversations[{i}] must be a [question, answer] pair of strings")
            pairs.append((pair[0], pair[1]))
        return None, pairs
    system, pairs, question = None, [], None
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: conversations[{i}] must be a {{'from', 'value'}} turn or a [question, answer] "
                            f"pair, got {type(turn).__name__}")
        role = str(turn.get("from", turn.get("role", ""))).lower()
        value = turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            raise DataError(f"{where}: conversations[{i}] has no text 'value'")
        if role == "system" and i == 0:
            system = value
        elif role in _HUMAN and question is None:
            question = value
        elif role in _GPT and question is not None:
            pairs.append((question, value))
            question = None
        else:
            raise DataError(f"{where}: conversations[{i}] from {role!r} breaks the human/gpt alternation "
                            "(turns must be human, gpt, human, gpt, ...)")
    if question is not None:
        raise DataError(f"{where}: the last human turn has no gpt answer")
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
    path = (root / image).resolve()
    if not path.is_relative_to(root):
        raise DataError(f"{where}: image {image!r} resolves to {path}, outside the data root {root}")
    return path


def parse_record(raw: dict, *, root: str | os.PathLike, where: str = "") -> Record:
    """One raw record (a dict from the data file) → Record, or DataError naming ``where`` and the problem."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(raw).__name__}")
    record_id = raw.get("id")
    if not isinstance(record_id, str) or not record_id:
        raise DataError(f"{where}: record has no string 'id'")
    where = f"{where} (id {record_id!r})"
    modality = raw.get("modality", record_id.split("_", 1)[0])
    if not isinstance(modality, str) or not modality:
        raise DataError(f"{where}: 'modality' must be a non-empty string")
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
            raise DataError(f"{where}: cannot infer the task (boxes in both question and answer); add a 'task' "
                            f"field, one of {', '.join(TASKS)}")
    elif not isinstance(task, str) or task.upper() not in TASKS:
        raise DataError(f"{where}: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    image = _image_path(raw, record_id, Path(root).resolve(), where)
    return Record(id=record_id, modality=modality.lower(), task=task.upper(), image=image, turns=tuple(turns),
                  system=system, where=where)


def check_modality(modality, where: str) -> str:
    """``modality`` lower-cased when it is one of MODALITIES; else DataError located at ``where``."""
    if not isinstance(modality, str) or modality.lower() not in MODALITIES:
        raise DataError(f"{where}: unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    return modality.lower()


def parse_jsonl(text: str, path) -> list[tuple[object, str]]:
    """(value, "file:line") for each non-blank line of JSON-lines ``text`` read from ``path``;
    DataError naming the line for one that is not valid JSON."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((json.loads(line), f"{path}:{number}"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    return out


def read_raw_records(path: str | os.PathLike) -> list[tuple[dict, str]]:
    """The raw records of a ``.json`` (a list of records) or ``.jsonl`` (one per line) file, each with
    its location ("file[index]" or "file:line") for error messages."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or (path.suffix != ".json" and not text.lstrip().startswith("[")):
        return parse_jsonl(text, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of records")
    return [(raw, f"{path}[{i}]") for i, raw in enumerate(data)]


def load_records(path: str | os.PathLike, *, root: str | os.PathLike | None = None,
                 check_images: bool = True) -> list[Record]:
    """Read and normalise every record of a data file (root: the image folder, default the file's folder).

    Raises DataError for the first bad record (unknown task, box outside [0, 1], image outside the
    root, malformed conversation), a missing image (``check_images``), or a duplicated id."""
    root = Path(root if root is not None else Path(path).parent)
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder")
    records, seen = [], {}
    for raw, where in read_raw_records(path):
        record = parse_record(raw, root=root, where=where)
        if record.id in seen:
            raise DataError(f"{where}: id {record.id!r} repeats the record at {seen[record.id]}")
        seen[record.id] = where
        if check_images and not record.image.is_file():
            raise DataError(f"{record.where}: image {record.image} does not exist")
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records")
    return records
