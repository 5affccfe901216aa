"""Bad input at the data boundary: data files, records, boxes and images a hostile user could write.

Every outcome must be one of two things: a ``DataError`` whose message names where the problem is
(``file:line`` for a JSON-lines file, ``file[index]`` for a JSON list, the file for a file-wide problem),
or a correct result (records that satisfy every rule of ``clinkd.data.records``; samples the encoder
accepts). Never another exception type, a hang (a FIFO is never opened) or a silently accepted bad record.

The first part holds one regression test per defect found so far; the second the property-based hunt
(hypothesis, derandomized and bounded: the whole module takes a few seconds).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinkd.data import DataError, SampleEncoder, load_records, normalise_boxes, parse_boxes
from clinkd.data.records import CONTROL_TOKENS, MODALITIES, TASKS, Record, parse_record
from tests.data import tiny

FAST = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
_COUNTER = itertools.count()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A data root with a few good images (ct_0000.png, ...) and a valid data file."""
    folder = tmp_path_factory.mktemp("bad-input")
    data = tiny.make_data(folder, 4, seed=11)
    image = (folder / (json.loads(data.read_text())[0]["id"] + ".png")).read_bytes()
    for name in VALID_IDS:
        (folder / f"{name}.png").write_bytes(image)
    (folder / "dir.png").mkdir()
    return folder


@pytest.fixture(scope="module")
def good(folder) -> dict:
    """A valid raw record whose image exists."""
    return json.loads((folder / "train.json").read_text())[0]


@pytest.fixture(scope="module")
def encoder():
    return SampleEncoder(tiny.processor(), max_length=512)


def write(folder: Path, text: str | bytes, suffix: str = ".jsonl") -> Path:
    path = folder / f"case{next(_COUNTER)}{suffix}"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return path


def jsonl(folder: Path, *records) -> Path:
    return write(folder, "".join(json.dumps(r) + "\n" for r in records))


def located(error: BaseException, path: Path, *, line: bool = True) -> bool:
    """A DataError naming ``path`` (with ``:line`` or ``[index]`` when ``line``)."""
    if not isinstance(error, DataError):
        return False
    pattern = re.escape(str(path)) + (r"(:\d+|\[\d+\])" if line else "")
    return re.search(pattern, str(error)) is not None


def load_error(path: Path, **kw) -> DataError:
    """The DataError of loading ``path``, checked to name it (with the line when ``line``, the default)."""
    line = kw.pop("line", True)
    with pytest.raises(DataError) as info:
        load_records(path, **kw)
    assert located(info.value, path, line=line), info.value
    return info.value


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width×height (its pixel data is empty): what a decompression bomb looks like
    to ``Image.open``, which reads only the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@contextmanager
def no_hang(seconds: int = 20):
    """Fail (instead of hanging the run) if the body blocks, e.g. on opening a FIFO."""

    def alarm(signum, frame):
        raise AssertionError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def record_for(folder: Path, good: dict, **changes) -> Record:
    return parse_record(dict(good, **changes), root=folder, where=f"{folder}/x.jsonl:1")


# --------------------------------------------------------------------------------------------------
# regressions: one test per defect


@pytest.mark.parametrize("size, kind", [((14000, 14000), "error"), ((10000, 10000), "warning")])
def test_decompression_bomb_is_a_data_error(folder, good, encoder, size, kind):
    """Before: PIL's DecompressionBombError (over 2× MAX_IMAGE_PIXELS) escaped as itself, and a
    DecompressionBombWarning (over MAX_IMAGE_PIXELS) let a huge image be decoded. Now both are a DataError
    naming the record, from the header check and from decoding."""
    (folder / "bomb.png").write_bytes(png_header(*size))
    record = record_for(folder, good, id="ct_bomb", image="bomb.png")
    for call in (encoder.check, encoder.encode, encoder.encode_prompt):
        with pytest.raises(DataError, match="too large to decode safely") as info:
            call(record)
        assert located(info.value, folder / "x.jsonl"), info.value


def test_data_file_that_is_not_utf8(folder, good):
    """Before: UnicodeDecodeError. Now a DataError naming file:line of the first bad byte."""
    text = json.dumps(good) + "\n" + json.dumps(dict(good, id="ct_0002_x")) + "\n"
    path = write(folder, text.encode().replace(b"ct_0002_x", b"ct_0002_\xe9"))
    error = load_error(path)
    assert f"{path}:2: not UTF-8 text (byte 0xe9" in str(error)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_deeply_nested_json(folder, good, suffix):
    """Before: RecursionError. Now a DataError naming the line."""
    deep = "[" * 100_000 + "]" * 100_000
    body = (
        (json.dumps(good) + "\n" + deep + "\n")
        if suffix == ".jsonl"
        else ("[\n" + json.dumps(good) + ",\n" + deep + "]")
    )
    path = write(folder, body, suffix)
    error = load_error(path)
    assert f"{path}:{2 if suffix == '.jsonl' else 3}: JSON nested" in str(error), error


def test_nul_byte_in_the_image_path(folder, good):
    """Before: ValueError (embedded null byte) from the OS layer. Now a DataError naming the record."""
    error = load_error(jsonl(folder, dict(good, image="ct\u0000.png")))
    assert "holds a NUL character" in str(error)


def test_image_that_is_a_folder_or_a_fifo(folder, good, encoder):
    """Before: a folder or a FIFO was reported as "does not exist" by load_records, and the encoder opened
    the FIFO (blocking forever). Now: "is not a regular file (...)", without opening it."""
    fifo = folder / "fifo.png"
    if not fifo.exists():
        os.mkfifo(fifo)
    with no_hang():
        for name, kind in (("dir.png", "a folder"), ("fifo.png", "a FIFO")):
            error = load_error(jsonl(folder, dict(good, image=name)))
            assert f"is not a regular file ({kind})" in str(error), error
            record = record_for(folder, good, image=name)  # an image replaced after loading
            for call in (encoder.check, encoder.encode):
                with pytest.raises(DataError, match=re.escape(f"is not a regular file ({kind})")):
                    call(record)


def test_data_file_that_is_a_fifo(folder):
    fifo = folder / "data-fifo.jsonl"
    if not fifo.exists():
        os.mkfifo(fifo)
    with no_hang():
        assert "is not a regular file (a FIFO)" in str(load_error(fifo, line=False))


@pytest.mark.parametrize(
    "box, message",
    [
        ("<box>(0.6,0.2),(0.3,0.4)</box>", "inverted corners (x1 > x2)"),
        ("<box>(0.1,0.5),(0.3,0.4)</box>", "inverted corners (y1 > y2)"),
        ("<box>(0.1,0.2),(0.3,0.4)", "is not closed"),
        ("(0.1,0.2),(0.3,0.4)</box>", "is not closed"),
        ("<|box_start|>(0.1,0.2),(0.3,0.4)", "is not closed"),
    ],
)
def test_training_boxes_are_checked_when_loaded(folder, good, box, message):
    """Before: an inverted box or an unclosed tag in a training record was accepted (training on it)."""
    record = dict(good, task="VG", conversations=[["<img>x</img> Where is it?", box]])
    error = load_error(jsonl(folder, good, record))
    assert message in str(error), error
    with pytest.raises(DataError, match=re.escape(message)):
        normalise_boxes(box)


def test_unknown_modality_in_training_data(folder, good):
    """Before: only eval and predict checked the modality; training accepted any id prefix."""
    error = load_error(jsonl(folder, dict(good, id="brain_0001")))
    assert "unknown modality 'brain'" in str(error)
    assert (
        load_records(jsonl(folder, dict(good, id="brain_0001", modality="MR", image=good["id"] + ".png")))[0].modality
        == "mr"
    )


def test_text_that_is_not_unicode_or_holds_template_tokens(folder, good):
    """A lone surrogate (a valid JSON escape) reached the tokenizer; a chat control token in an answer cut
    its supervised span at the wrong place. Both are refused when the record loads."""
    bad = json.dumps(dict(good, conversations=[["<img>x</img> q \ud800", "a"]]))
    assert "\\ud800" in bad
    error = load_error(write(folder, bad + "\n"))
    assert "not a Unicode character" in str(error)
    for token in CONTROL_TOKENS:
        error = load_error(jsonl(folder, dict(good, conversations=[["<img>x</img> q", f"a {token} b"]])))
        assert token in str(error)


def test_other_escapes_found_by_the_hunt(folder, good):
    """A system turn alone (IndexError), a role that is not a string, an integer literal over Python's
    digit limit (ValueError), a huge id in every message: all DataError naming the line."""
    cases = [
        (dict(good, conversations=[{"from": "system", "value": "s"}]), "holds no human/gpt pair"),
        (
            dict(good, conversations=[{"from": ["human"], "value": "q"}, {"from": "gpt", "value": "a"}]),
            "'from' must be a string",
        ),
    ]
    for raw, message in cases:
        error = load_error(jsonl(folder, raw))
        assert message in str(error), error
    error = load_error(write(folder, '{"id": ' + "1" * 5000 + "}\n"))
    assert "not valid JSON" in str(error)
    error = load_error(jsonl(folder, dict(good, id="ct_" + "x" * 100_000)))
    assert len(str(error)) < 1000


def test_line_separators_inside_json_strings(folder, good):
    """U+2028 is text inside a JSON string: the line is one record (before: split into two broken lines)."""
    record = dict(good, conversations=[["<img>x</img> a\u2028b", "c\u0085d"]])
    path = write(folder, json.dumps(record, ensure_ascii=False) + "\n")
    assert load_records(path)[0].turns[0] == ("a\u2028b", "c\u0085d")


def test_image_the_processor_refuses(folder, good, encoder):
    """An aspect ratio over 200: the Qwen2-VL resize raised ValueError; now a DataError naming the record."""
    from PIL import Image

    Image.new("RGB", (250, 1)).save(folder / "thin.png")
    record = record_for(folder, good, image="thin.png")
    for call in (encoder.check, encoder.encode):
        with pytest.raises(DataError, match="cannot be processed: absolute aspect ratio") as info:
            call(record)
        assert located(info.value, folder / "x.jsonl")


# --------------------------------------------------------------------------------------------------
# the hunt: random malformed input, the category of every outcome checked


def well_formed(record: Record, root: Path) -> None:
    """Everything load_records promises about a record it returns."""
    assert record.task in TASKS and record.modality in MODALITIES and record.id
    assert record.image.is_relative_to(root.resolve())
    for question, answer in record.turns:
        for text in (question, answer):
            text.encode("utf-8")
            assert not any(t in text for t in CONTROL_TOKENS)
            assert "<box>" not in text and "</box>" not in text and "<box_start>" not in text
            for x1, y1, x2, y2 in parse_boxes(text):
                assert 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@FAST
@given(
    st.lists(
        st.one_of(
            st.text(max_size=40), st.binary(max_size=40).map(lambda b: b.decode("latin-1")), json_values.map(json.dumps)
        ),
        min_size=0,
        max_size=5,
    ),
    st.sampled_from([".jsonl", ".json", ".txt"]),
)
def test_random_lines(folder, lines, suffix):
    """Random text, bytes and JSON values as the lines of a data file."""
    path = write(folder, "\n".join(lines).encode("utf-8", "surrogatepass"), suffix)
    try:
        records = load_records(path, check_images=False)
    except DataError as e:
        assert located(e, path, line=not str(e).endswith(("no records", "must hold a list of records"))), e
    else:
        for record in records:
            well_formed(record, folder)


VALID_IDS = ("ct_0001_liver", "mr_0002", "x_0003_lung", "FUNDUS_4", "dermoscopy_5_polyp")
_numbers = st.sampled_from(
    ["0", "1", "0.5", ".25", "1.", "0.75", "-0.1", "1.5", "1e-1", "2e0", " 0.3 ", "nan", "x", ""]
)
_boxes = st.builds(
    lambda a, b, c, d, form: form.format(f"({a},{b}),({c},{d})"),
    _numbers,
    _numbers,
    _numbers,
    _numbers,
    st.sampled_from(
        [
            "<box>{}</box>",
            "<box_start>{}<box_end>",
            "<|box_start|>{}<|box_end|>",
            "<box>{}",
            "{}</box>",
            "<box><box>{}</box></box>",
            "<box>{}<|box_end|>",
        ]
    ),
)
_words = st.sampled_from(["Where", " is", " the", " liver", "?", " lesion", "<img>x.png</img>", "<image>", " "])
_odd = st.sampled_from(["\ud800", "<|im_end|>", "<|image_pad|>", "\0", "\u2028", "</img>", "<box>"]) | st.characters()
# mostly words and boxes, now and then something odd
_texts = st.lists(
    st.integers(0, 9).flatmap(lambda i: _odd if i == 9 else _boxes if i >= 7 else _words), max_size=8
).map("".join)


def _one_of_mostly(good, bad):
    """``good`` three times out of four (so that many records load), else ``bad``."""
    return st.integers(0, 3).flatmap(lambda i: bad if i == 3 else good)


_pairs = st.lists(st.tuples(_texts, _texts).map(list), min_size=1, max_size=3)
_turns = _pairs.map(lambda pairs: [{"from": r, "value": v} for q, a in pairs for r, v in (("human", q), ("gpt", a))])
_conversations = _one_of_mostly(
    _pairs | _turns,
    st.one_of(
        json_values,
        st.lists(
            st.fixed_dictionaries(
                {
                    "from": st.sampled_from(["human", "gpt", "user", "system", "robot", 3]),
                    "value": _texts | st.integers(),
                }
            ),
            max_size=4,
        ),
        _pairs.map(
            lambda p: (
                [{"from": "system", "value": "s"}]
                + [x for q, a in p for x in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
            )
        ),
    ),
)
_records = st.fixed_dictionaries(
    {
        "id": _one_of_mostly(
            st.sampled_from(VALID_IDS), st.sampled_from(["", "brain_2", "ct_../../x", "ct"]) | json_values
        ),
        "conversations": _conversations,
    },
    optional={
        "task": _one_of_mostly(st.sampled_from(["vg", "ROC", "rc", "MIA"]), st.just("SEG") | json_values),
        "modality": _one_of_mostly(st.sampled_from(["ct", "MR"]), st.sampled_from(["brain", ""]) | json_values),
        "image": _one_of_mostly(
            st.sampled_from([i + ".png" for i in VALID_IDS]),
            st.sampled_from(["../x.png", "/etc/passwd", "a\0b", "dir.png", "", "nope.png"]) | json_values,
        ),
        "images": st.lists(st.sampled_from([i + ".png" for i in VALID_IDS]), max_size=2) | json_values,
    },
)


@FAST
@given(st.lists(_records, min_size=1, max_size=3))
def test_random_records(folder, good, raws):
    """Random record fields (ids, tasks, modalities, image paths, conversations of every shape)."""
    path = write(folder, "".join(json.dumps(r) + "\n" for r in [good] + raws))
    try:
        records = load_records(path)
    except DataError as e:
        assert located(e, path), e
    else:
        for record in records:
            well_formed(record, folder)
            assert record.image.is_file()


@FAST
@given(st.lists(_boxes | st.text(max_size=6), max_size=4).map("".join))
def test_random_box_strings(text):
    """Random box tags and corners: normalised boxes are in [0, 1] with sorted corners, or a DataError."""
    try:
        out = normalise_boxes(text)
    except DataError as e:
        assert str(e).startswith("box"), e
        return
    assert parse_boxes(out) == parse_boxes(text)
    for x1, y1, x2, y2 in parse_boxes(out):
        assert 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1
    assert "<box>" not in out and "</box>" not in out


@pytest.fixture(scope="module")
def png_bytes(folder) -> bytes:
    return (folder / (json.loads((folder / "train.json").read_text())[0]["id"] + ".png")).read_bytes()


@settings(FAST, max_examples=40)
@given(st.data())
def test_random_image_bytes(folder, good, encoder, png_bytes, data):
    """A PNG with bytes flipped, cut or appended: DataError naming the record, or a sample the encoder
    makes (and then its check and its encoding agree on the length)."""
    raw = bytearray(png_bytes)
    for _ in range(data.draw(st.integers(0, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))] + data.draw(st.binary(max_size=8))
    name = f"fuzz{next(_COUNTER)}.png"
    (folder / name).write_bytes(bytes(raw))
    record = record_for(folder, good, image=name)
    outcomes = []
    for call in (encoder.check, encoder.encode):
        try:
            outcomes.append(call(record))
        except DataError as e:
            assert located(e, folder / "x.jsonl") and name in str(e), e
            outcomes.append(None)
    if outcomes[0] is not None and outcomes[1] is not None:
        assert outcomes[0] == outcomes[1]["input_ids"].numel()


@settings(FAST, max_examples=30)
@given(st.lists(_records, min_size=1, max_size=2))
def test_what_loads_encodes(folder, good, encoder, raws):
    """A record load_records accepts is encoded, or refused with a DataError naming it (a question too long
    for max_length, ...): the encoder raises nothing else on loaded records."""
    path = write(folder, "".join(json.dumps(r) + "\n" for r in [good] + raws))
    try:
        records = load_records(path)
    except DataError:
        return
    for record in records:
        try:
            length = encoder.check(record)
        except DataError as e:
            assert located(e, path), e
        else:
            assert encoder.encode(record)["input_ids"].numel() == length
