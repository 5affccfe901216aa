"""Importing a served or offline teacher's top-k log-probabilities (vLLM's prompt_logprobs) into a store.

The input files are written in vLLM's exact structure from a tiny teacher's own logits: per prompt
position i >= 1, log softmax of the logits at position i - 1, its top-n tokens plus prompt token i, keys
as strings, values {logprob, rank, decoded_token}, entry 0 null. The imported store is compared with
clinkd's own teacher pass over the same teacher (exact at T = 1), and with the documented
approximation (computed here independently, in float64) at T != 1, whose bound is checked against the
exact tempered distribution.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from clinkd.data.collate import model_inputs
from clinkd.data.offline_processor import tokenizer_fingerprint
from clinkd.distill import (
    LogprobsError,
    PseudoLabelStore,
    StoreMeta,
    cache_pseudo_labels,
    import_prompt_logprobs,
    sample_tokens,
    tempered_rows,
)
from clinkd.distill.imported import supervised_positions
from tests.train import setup

K = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny data set, its teacher (vocabulary larger than the student's) and the teacher's logits
    (float64, every position) per sample."""
    folder = tmp_path_factory.mktemp("import")
    dataset = setup.dataset(folder / "data", n=5, seed=random.randrange(1000))
    teacher = setup.teacher(seed=random.randrange(1000))
    logits = []
    with torch.no_grad():
        for i in range(len(dataset)):
            batch = setup.collator()([dataset[i]])
            inputs = {k: v for k, v in model_inputs(teacher, batch).items() if k != "labels"}
            logits.append(teacher(**inputs).logits[0].double())
    vocab = len(setup.tiny.processor().tokenizer)
    return dataset, teacher, logits, vocab


def _meta(vocab: int, temperature: float, k: int = K) -> StoreMeta:
    fingerprint = tokenizer_fingerprint(setup.tiny.processor().tokenizer)
    return StoreMeta(teacher="tiny", k=k, temperature=temperature, vocab_size=vocab, tokenizer_hash=fingerprint)


def vllm_entries(logits: torch.Tensor, input_ids: list[int], n: int) -> list:
    """vLLM's prompt_logprobs of a prompt from the teacher's logits [L, V]: entry 0 null, entry i the
    top-n tokens of log softmax(logits[i - 1]) plus prompt token i, as the server writes them."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    order = torch.sort(-logp, dim=-1, stable=True).indices[:, :n]
    out = [None]
    for i in range(1, len(input_ids)):
        row = logp[i - 1]
        entry = {}
        for token in order[i - 1].tolist() + [input_ids[i]]:
            rank = 1 + int((row > row[token]).sum())
            entry[str(token)] = {"logprob": float(row[token]), "rank": rank, "decoded_token": f"<{token}>"}
        out.append(entry)
    return out


def write_file(path, tiny, n: int = K, *, vocab: int | None = None, order=None, edit=None):
    """The JSONL of every sample (in ``order``), from the teacher's logits restricted to ``vocab``
    columns; ``edit(i, record)`` changes sample i's record before it is written."""
    dataset, _, logits, student_vocab = tiny
    vocab = student_vocab if vocab is None else vocab
    lines = []
    for i in order if order is not None else range(len(dataset)):
        input_ids, _ = sample_tokens(dataset, i)
        record = {
            "id": dataset.ids[i],
            "prompt_token_ids": input_ids,
            "prompt_logprobs": vllm_entries(logits[i][:, :vocab], input_ids, n),
        }
        if edit is not None:
            record = edit(i, record) or record
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


def reference(tmp_path, tiny, meta):
    """clinkd's own pseudo-label pass over the same teacher."""
    dataset, teacher, _, _ = tiny
    assert cache_pseudo_labels(teacher, dataset, setup.collator(), tmp_path / "ref", meta=meta, progress=False)
    return PseudoLabelStore(tmp_path / "ref", expect=meta)


def assert_same_rows(got: PseudoLabelStore, want: PseudoLabelStore, *, lse: bool = True, atol: float = 2e-5):
    assert got.ids == want.ids
    for sid in want.ids:
        (a, ta), (b, tb) = got.get(sid), want.get(sid)
        assert torch.equal(ta, tb), sid
        assert torch.equal(a.indices, b.indices), sid
        for name in ("logprobs", "margin", "residual") + (("lse",) if lse else ()):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=atol, rtol=0, msg=f"{sid} {name}")


# ------------------------------------------------------------------ agreement with clinkd's own pass


def test_sample_tokens_are_the_training_tokens(tiny):
    dataset = tiny[0]
    for i in range(len(dataset)):
        input_ids, labels = sample_tokens(dataset, i)
        sample = dataset[i]
        assert input_ids == sample["input_ids"].tolist() and labels == sample["labels"].tolist()


def test_exact_at_temperature_one(tmp_path, tiny):
    """Top-k + the prompt token, as vLLM gives them: the store clinkd's own pass writes (lse aside:
    imported rows have lse 0, the log-sum-exp of normalised log-probabilities)."""
    meta = _meta(tiny[3], 1.0)
    source = write_file(tmp_path / "t.jsonl", tiny, order=[3, 0, 4, 2, 1])  # any line order
    summary = import_prompt_logprobs(
        source, tiny[0], tmp_path / "pl", meta, teacher_vocab_size=tiny[3] + 13, shard_size=2, progress=False
    )
    assert summary.complete and summary.imported == 5 and summary.max_error_bound == 0.0
    store = PseudoLabelStore(tmp_path / "pl", expect=meta)
    store.verify_all()
    want = reference(tmp_path, tiny, meta)
    assert_same_rows(store, want, lse=False)
    assert summary.rows == sum(want.get(sid)[1].numel() for sid in want.ids)
    for sid in store.ids:
        assert store.get(sid)[0].lse.abs().max() < 1e-5


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_every_token_listed_is_exact_with_the_teachers_extra_columns(tmp_path, tiny, temperature):
    """prompt_logprobs over the teacher's whole vocabulary (larger than the student's): the columns the
    student lacks are dropped and the rest renormalised, as clinkd's pass does; nothing is unknown, so
    the import is exact at any temperature."""
    dataset, teacher, _, vocab = tiny
    teacher_vocab = vocab + 13
    meta = _meta(vocab, temperature)
    source = write_file(tmp_path / "t.jsonl", tiny, n=teacher_vocab, vocab=teacher_vocab)
    summary = import_prompt_logprobs(source, dataset, tmp_path / "pl", meta, teacher_vocab_size=teacher_vocab)
    assert summary.complete and summary.max_error_bound < 1e-9
    want = reference(tmp_path, tiny, meta)
    assert_same_rows(PseudoLabelStore(tmp_path / "pl", expect=meta), want, lse=False)


def _approximation(entry: dict, vocab: int, k: int, temperature: float):
    """The documented approximation of one row, written out independently in float64 Python: (top-k
    ids, their log q, log Z, δ)."""
    items = sorted(((int(key), v["logprob"]) for key, v in entry.items()), key=lambda kv: (-kv[1], kv[0]))
    ranks = {int(key): v["rank"] for key, v in entry.items()}
    top = [(t, lp) for t, lp in items if ranks[t] <= len(items)]  # the teacher's top tokens
    rest = max(0.0, 1.0 - math.fsum(math.exp(lp) for _, lp in items))
    cap, n_rest, inv = math.exp(top[-1][1]), vocab - len(items), 1.0 / temperature
    known = math.fsum(math.exp(lp * inv) for _, lp in items)
    if rest > 0:
        uniform = n_rest * (rest / n_rest) ** inv
        chunks = math.floor(rest / cap)
        chunked = chunks * cap**inv + (rest - chunks * cap) ** inv
    else:
        uniform = chunked = 0.0
    z_lo, z_hi = known + min(uniform, chunked), known + max(uniform, chunked)
    log_z = 0.5 * (math.log(z_lo) + math.log(z_hi))
    return [t for t, _ in top[:k]], [lp * inv - log_z for _, lp in top[:k]], log_z, 0.5 * math.log(z_hi / z_lo)


@pytest.mark.parametrize("temperature", [0.5, 0.8, 2.0])
def test_tempered_import_is_the_documented_approximation_within_its_bound(tmp_path, tiny, temperature):
    dataset, _, logits, vocab = tiny
    meta = _meta(vocab, temperature)
    source = write_file(tmp_path / "t.jsonl", tiny)
    summary = import_prompt_logprobs(source, dataset, tmp_path / "pl", meta, progress=False)
    store = PseudoLabelStore(tmp_path / "pl", expect=meta)
    records = [json.loads(line) for line in source.read_text().splitlines()]
    worst, widest = 0.0, 0.0
    for i, record in enumerate(records):
        labels, _ = store.get(record["id"])
        exact = torch.log_softmax(logits[i][:, :vocab] / temperature, dim=-1)
        for row, t in enumerate(supervised_positions(sample_tokens(dataset, i)[1])):
            ids, logq, log_z, delta = _approximation(record["prompt_logprobs"][t + 1], vocab, K, temperature)
            assert labels.indices[row].tolist() == ids
            got = labels.logprobs[row].double()
            torch.testing.assert_close(got, torch.tensor(logq, dtype=torch.float64), atol=2e-5, rtol=0)
            assert abs(float(labels.lse[row]) - log_z) < 2e-5
            p = [math.exp(x) for x in logq]
            assert abs(float(labels.margin[row]) - (p[0] - p[1])) < 2e-5
            assert abs(float(labels.residual[row]) - max(0.0, 1 - math.fsum(p))) < 2e-5
            # the bound holds against the exact tempered distribution of the whole vocabulary
            error = float((got - exact[t, ids]).abs().max())
            assert error <= delta + 2e-5, (record["id"], t, error, delta)
            truth = exact[t, ids].exp()
            assert abs(float(labels.residual[row]) - (1 - float(truth.sum()))) <= math.expm1(delta) + 2e-5
            worst, widest = max(worst, error), max(widest, delta)
    assert widest > 0 and abs(summary.max_error_bound - widest) < 1e-6
    assert worst <= widest + 2e-5


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_the_bound_is_reached_by_both_extreme_tails(temperature):
    """The residual spread uniformly or in chunks of the cap: the two ends of the bound, errors of ±δ."""
    vocab, listed = 60, 4
    head = torch.rand(listed).double().sort(descending=True).values * 0.2 + 0.05
    cap, rest = float(head[-1]), 1.0 - float(head.sum())
    n_rest = vocab - listed
    uniform = torch.full((n_rest,), rest / n_rest, dtype=torch.float64)
    chunks = int(rest // cap)
    chunked = torch.zeros(n_rest, dtype=torch.float64)
    chunked[:chunks] = cap
    chunked[chunks] = rest - chunks * cap
    errors = []
    for tail in (uniform, chunked):
        full = torch.cat([head, tail])
        exact = torch.log_softmax(full.log() / temperature, dim=-1)[:listed]
        logq, _, delta = tempered_rows(
            head.log()[None], head.log()[None], head.log()[-1:], torch.tensor([n_rest]), temperature
        )
        errors.append(float((logq[0] - exact).mean()))
        assert torch.allclose(logq[0] - exact, torch.full((listed,), errors[-1], dtype=torch.float64), atol=1e-12)
        assert abs(abs(errors[-1]) - float(delta[0])) < 1e-9
    assert errors[0] * errors[1] < 0 and float(delta[0]) > 0


# ------------------------------------------------------------------ refusals


def _refused(tmp_path, tiny, match: str, *, n: int = K, edit=None, text=None, temperature: float = 1.0):
    source = tmp_path / "bad.jsonl"
    if text is not None:
        source.write_text(text)
    else:
        write_file(source, tiny, n=n, edit=edit)
    with pytest.raises(LogprobsError, match=match) as error:
        import_prompt_logprobs(source, tiny[0], tmp_path / "pl", _meta(tiny[3], temperature), progress=False)
    return str(error.value)


def _supervised(tiny, i: int) -> int:
    """A supervised row's prompt position (t + 1) of sample i, picked at random."""
    return random.choice(supervised_positions(sample_tokens(tiny[0], i)[1])) + 1


def test_ids_unknown_twice_or_missing_are_refused_before_anything_is_written(tmp_path, tiny):
    ids = tiny[0].ids

    def rename(i, record):
        if i == 2:
            record["id"] = "nobody"

    message = _refused(tmp_path, tiny, r"bad.jsonl:3: sample 'nobody' is not in the data set", edit=rename)
    assert "nobody" in message
    manifest = json.loads((tmp_path / "pl" / "manifest.json").read_text())
    assert manifest["shards"] == []  # refused before the first shard
    text = (tmp_path / "bad.jsonl").read_text().replace('"nobody"', json.dumps(ids[0]))
    _refused(tmp_path, tiny, rf"bad.jsonl:3: sample '{ids[0]}' is given twice \(first on line 1\)", text=text)
    lines = [line for line in text.splitlines() if json.dumps(ids[2]) not in line and json.dumps(ids[0]) not in line]
    _refused(
        tmp_path,
        tiny,
        rf"has no line for 2 of the 5 samples still to import \('{ids[0]}', '{ids[2]}'\)",
        text="\n".join(lines),
    )
    _refused(tmp_path, tiny, r"bad.jsonl:1 is not JSON", text="{not json\n")


def test_another_tokenisation_is_refused_at_its_first_differing_position(tmp_path, tiny):
    i = random.randrange(len(tiny[0]))
    sid = tiny[0].ids[i]
    at = random.randrange(1, len(sample_tokens(tiny[0], i)[0]))

    def retokenise(j, record):
        if j == i:
            record["prompt_token_ids"][at] = (record["prompt_token_ids"][at] + 1) % tiny[3]

    _refused(
        tmp_path,
        tiny,
        rf"sample '{sid}': prompt_token_ids differ from the data set's tokenisation at position {at} ",
        edit=retokenise,
    )

    def truncate(j, record):
        if j == i:
            record["prompt_token_ids"].pop()
            record["prompt_logprobs"].pop()

    _refused(
        tmp_path,
        tiny,
        rf"sample '{sid}': prompt_token_ids differ .* at position {len(sample_tokens(tiny[0], i)[0]) - 1} ",
        edit=truncate,
    )


def test_misaligned_rows_are_refused_by_sample_and_position(tmp_path, tiny):
    i = random.randrange(len(tiny[0]))
    sid, at = tiny[0].ids[i], _supervised(tiny, i)

    def shift(j, record):
        if j == i:
            record["prompt_logprobs"] = record["prompt_logprobs"][1:] + [None]

    _refused(tmp_path, tiny, r"prompt_logprobs\[0\] must be null .* shifted", edit=shift)

    def unlist(j, record):
        if j == i:
            del record["prompt_logprobs"][at][str(record["prompt_token_ids"][at])]

    _refused(tmp_path, tiny, rf"sample '{sid}': prompt_logprobs\[{at}\] .* does not list the prompt token", edit=unlist)

    def shorten(j, record):
        if j == i:
            record["prompt_logprobs"].pop()

    _refused(tmp_path, tiny, r"prompt_logprobs must be a list of \d+ entries", edit=shorten)


def test_prefix_cached_rows_are_refused_where_supervised_and_ignored_elsewhere(tmp_path, tiny):
    i = random.randrange(len(tiny[0]))
    sid, at = tiny[0].ids[i], _supervised(tiny, i)

    def drop(j, record):
        if j == i:
            record["prompt_logprobs"][at] = None

    message = _refused(tmp_path, tiny, rf"sample '{sid}': prompt_logprobs\[{at}\] .* is null", edit=drop)
    assert "enable_prefix_caching=False" in message

    def cached_prefix(j, record):  # the system prompt and question, served from a prefix cache
        labels = sample_tokens(tiny[0], j)[1]
        for t in range(len(labels) - 1):
            if labels[t + 1] == -100:
                record["prompt_logprobs"][t + 1] = None

    source = write_file(tmp_path / "ok.jsonl", tiny, edit=cached_prefix)
    assert import_prompt_logprobs(source, tiny[0], tmp_path / "ok", _meta(tiny[3], 1.0), progress=False).complete


def test_too_few_tokens_bad_values_and_foreign_ids_are_refused(tmp_path, tiny):
    i = random.randrange(len(tiny[0]))
    sid, at = tiny[0].ids[i], _supervised(tiny, i)
    _refused(
        tmp_path,
        tiny,
        rf"holds [345] of the teacher's top tokens .* needs {K}: rerun with prompt_logprobs >= {K}",
        n=K - 2,
    )

    def spoil(value):
        def edit(j, record):
            if j == i:
                entry = record["prompt_logprobs"][at]
                entry[next(iter(entry))]["logprob"] = value

        return edit

    for value in (float("nan"), float("-inf"), float("inf")):
        _refused(
            tmp_path, tiny, rf"sample '{sid}': prompt_logprobs\[{at}\].* is not a finite number", edit=spoil(value)
        )
    _refused(tmp_path, tiny, r"is above 0 \(not a log-probability\)", edit=spoil(0.5))

    def foreign(j, record):
        if j == i:
            record["prompt_logprobs"][at][str(tiny[3] + 99)] = {"logprob": -30.0, "rank": 9999, "decoded_token": "?"}

    _refused(
        tmp_path,
        tiny,
        rf"prompt_logprobs\[{at}\].*token id {tiny[3] + 99} is outside the teacher's vocabulary",
        edit=foreign,
    )

    def unnormalised(j, record):
        if j == i:
            for value in record["prompt_logprobs"][at].values():
                value["logprob"] = -0.1

    _refused(tmp_path, tiny, rf"prompt_logprobs\[{at}\].* sum to .* > 1", edit=unnormalised)


def _without_ranks(i, record):
    for entry in record["prompt_logprobs"][1:]:
        for value in entry.values():
            value.pop("rank")


def test_files_without_ranks_import_exactly_with_one_more_token(tmp_path, tiny):
    """Without ranks the prompt token at the bottom of an entry is taken as vLLM's extra entry: asked for
    k + 1 tokens, such a file gives clinkd's own rows; asked for k, a row that needs its bottom entry is
    refused with that advice, never imported short."""
    meta = _meta(tiny[3], 1.0)
    source = write_file(tmp_path / "plain.jsonl", tiny, n=K + 1, edit=_without_ranks)
    summary = import_prompt_logprobs(source, tiny[0], tmp_path / "pl", meta, progress=False)
    assert summary.complete
    assert_same_rows(PseudoLabelStore(tmp_path / "pl", expect=meta), reference(tmp_path, tiny, meta), lse=False)
    short = write_file(tmp_path / "short.jsonl", tiny, n=K, edit=_without_ranks)
    try:
        import_prompt_logprobs(short, tiny[0], tmp_path / "pl-short", meta, progress=False)
    except LogprobsError as e:
        assert f"or {K + 1}: the entries carry no rank" in str(e), e
    else:  # no supervised row needed its bottom entry: then every row is whole
        assert_same_rows(PseudoLabelStore(tmp_path / "pl-short", expect=meta), PseudoLabelStore(tmp_path / "pl"))


# ------------------------------------------------------------------ resume


def test_a_refused_import_keeps_its_whole_shards_and_resumes(tmp_path, tiny):
    meta = _meta(tiny[3], 0.8)
    bad = random.randrange(2, len(tiny[0]))

    def drop(j, record):
        if j == bad:
            record["prompt_logprobs"][_supervised(tiny, j)] = None

    source = write_file(tmp_path / "t.jsonl", tiny, edit=drop)
    with pytest.raises(LogprobsError, match="is null"):
        import_prompt_logprobs(source, tiny[0], tmp_path / "pl", meta, shard_size=1, progress=False)
    partial = PseudoLabelStore(tmp_path / "pl", expect=meta, allow_incomplete=True)
    assert partial.ids == tiny[0].ids[:bad]
    write_file(source, tiny)
    summary = import_prompt_logprobs(source, tiny[0], tmp_path / "pl", meta, shard_size=1, progress=False)
    assert summary.complete and summary.imported == len(tiny[0]) - bad
    write_file(tmp_path / "all.jsonl", tiny)
    import_prompt_logprobs(tmp_path / "all.jsonl", tiny[0], tmp_path / "whole", meta, shard_size=1, progress=False)
    assert_same_rows(PseudoLabelStore(tmp_path / "pl", expect=meta), PseudoLabelStore(tmp_path / "whole"), atol=0)
    again = import_prompt_logprobs(source, tiny[0], tmp_path / "pl", meta, progress=False)  # complete: nothing to do
    assert again.complete and again.imported == 0


# ------------------------------------------------------------------ the command


def _run_teacher(tmp_path):
    """A run config (kd stage: k=6, T=0.8, teacher: store), its prepared run and its teacher's logits."""
    from clinkd.train.config import load_config
    from clinkd.train.models import build_model, vocab_size
    from clinkd.train.run import prepare_run

    data_file = setup.tiny.make_data(tmp_path / "data", 4, seed=random.randrange(1000))
    config_path = setup.run_config(tmp_path, data_file, kd_steps=1, sft_steps=1, save_steps=1)
    config = load_config(config_path)
    prepared = prepare_run(config)
    teacher = build_model(config.teacher, prepared.model_configs["teacher"], seed=config.seed + 1).eval()
    logits = []
    with torch.no_grad():
        for i in range(len(prepared.dataset)):
            batch = prepared.collator([prepared.dataset[i]])
            inputs = {k: v for k, v in model_inputs(teacher, batch).items() if k != "labels"}
            logits.append(teacher(**inputs).logits[0].double())
    vocab = vocab_size(prepared.model_configs["student"])
    return config_path, config, prepared, (prepared.dataset, teacher, logits, vocab)


def _one_line_error(capsys, argv) -> str:
    from clinkd.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("clinkd distill: error: "), err
    return err


def test_the_command_fills_the_store_train_reads(tmp_path, capsys):
    from clinkd.cli import main
    from clinkd.train.artifacts import store_meta

    config_path, config, prepared, run = _run_teacher(tmp_path)
    stage = config.stages[0]
    # over the teacher's vocabulary, whose 13 columns past the student's may rank among its top tokens
    source = write_file(tmp_path / "teacher.jsonl", run, n=K + 13, vocab=run[3] + 13)
    base = ["distill", "import", "--config", str(config_path)]
    bad = write_file(tmp_path / "bad.jsonl", run, edit=lambda i, r: r.update(id="nobody") if i == 1 else None)
    assert "bad.jsonl:2: sample 'nobody' is not in the data set" in _one_line_error(capsys, base + ["--from", str(bad)])
    assert "no kd stage with teacher: store named sft" in _one_line_error(
        capsys, base + ["--stage", "sft", "--from", str(source)]
    )
    assert "No such file or directory" in _one_line_error(capsys, base + ["--from", str(tmp_path / "none.jsonl")])
    assert main(base) == 2 and "--from" in capsys.readouterr().err  # argparse: the required option

    assert main(base + ["--from", str(source), "--format", "vllm", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"kd: {config.store_path(stage)} (4 samples, k=6; imported 4 samples") and "T=0.8" in out
    meta = store_meta(config, stage, prepared.processor, run[3])
    store = PseudoLabelStore(config.store_path(stage), expect=meta)
    assert cache_pseudo_labels(run[1], prepared.dataset, prepared.collator, tmp_path / "ref", meta=meta, progress=False)
    want = PseudoLabelStore(tmp_path / "ref", expect=meta)
    for sid in want.ids:
        (a, ta), (b, tb) = store.get(sid), want.get(sid)
        assert torch.equal(ta, tb) and torch.equal(a.indices, b.indices)
    stamp = (config.store_path(stage) / "manifest.json").stat().st_mtime_ns
    assert main(["train", "--config", str(config_path), "--no-progress"]) == 0  # reads the imported store
    assert (config.store_path(stage) / "manifest.json").stat().st_mtime_ns == stamp


def test_the_command_has_help(capsys):
    from clinkd.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["distill", "import", "--help"])
    assert exit_.value.code == 0 and "--from" in capsys.readouterr().out


# ------------------------------------------------------------------ the vLLM script (vLLM itself is not needed)


def _script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "vllm_prompt_logprobs.py"
    spec = importlib.util.spec_from_file_location("vllm_prompt_logprobs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_scripts_lines_from_request_outputs_import(tmp_path, tiny):
    """RequestOutput-like objects (prompt_token_ids, prompt_logprobs of Logprob(logprob, rank,
    decoded_token), the first entry None) → the script's lines → a store equal to the file route's."""
    import sys
    from dataclasses import dataclass
    from types import SimpleNamespace

    script = _script()
    assert "vllm" not in sys.modules

    @dataclass
    class Logprob:
        logprob: float
        rank: int | None = None
        decoded_token: str | None = None

    dataset = tiny[0]
    image = dataset.encoder.image_token_id
    lines = []
    for i in range(len(dataset)):
        ids = sample_tokens(dataset, i)[0]
        collapsed = script.collapse_image_pads(ids, image)
        assert collapsed.count(image) == 1 and len(collapsed) == len(ids) - ids.count(image) + 1
        entries = vllm_entries(tiny[2][i][:, : tiny[3]], ids, K)
        prompt = [None] + [{int(t): Logprob(**v) for t, v in e.items()} for e in entries[1:]]
        lines.append(script.output_line(dataset.ids[i], SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=prompt)))
    (tmp_path / "script.jsonl").write_text("\n".join(lines) + "\n")
    meta = _meta(tiny[3], 0.8)
    import_prompt_logprobs(tmp_path / "script.jsonl", dataset, tmp_path / "a", meta, progress=False)
    import_prompt_logprobs(write_file(tmp_path / "f.jsonl", tiny), dataset, tmp_path / "b", meta, progress=False)
    assert_same_rows(PseudoLabelStore(tmp_path / "a"), PseudoLabelStore(tmp_path / "b"), atol=0)
