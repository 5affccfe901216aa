"""Top-k teacher log-probabilities computed elsewhere (a served or offline teacher) → the pseudo-label store.

    meta = store_meta(config, stage, processor, student_vocab)        # what clinkd distill cache writes
    import_prompt_logprobs("teacher.jsonl", dataset, store_path, meta, teacher_vocab_size=teacher_vocab)

The input (``format="vllm"``) is JSON Lines, one line per sample, in vLLM's own fields:

    {"id": "<sample id>", "prompt_token_ids": [t0, t1, ...],
     "prompt_logprobs": [null, {"<token id>": {"logprob": -0.1, "rank": 1, "decoded_token": "a"}, ...}, ...]}

``prompt_logprobs[i]`` is the teacher's distribution of prompt token i given tokens < i: its top-n
tokens plus token i itself (so n or n + 1 entries), raw log-probabilities (before any temperature);
entry 0 is null. The store's row "position t predicts token t + 1" is therefore ``prompt_logprobs[t + 1]``,
and exactly the supervised rows are imported (those ``next_token_targets`` keeps, in order), so the
store is the one ``clinkd distill cache`` would write: bound to the data set's ids by
``PseudoLabelWriter`` (atomic shards, resume, checks on read). Only JSON is read.

Refused, each by a ``LogprobsError`` naming the file, line, sample and prompt position: an id outside
the data set or given twice, a pending sample with no line, ``prompt_token_ids`` other than the data
set's tokenisation of the sample (another tokenizer, chat template, image size or max_length; the first
differing position is named), a list of another length, entry 0 not null (shifted), a null entry at a
supervised row (vLLM drops prompt log-probabilities of tokens served from its prefix cache), an entry
that does not list the token it predicts (misaligned), fewer than max(k, 2) of the teacher's top tokens
in the student's vocabulary, a non-finite or positive log-probability, log-probabilities summing over 1,
a token id outside the teacher's vocabulary.

Per row (float64): ids in [vocab_size, teacher_vocab_size) are columns the student does not have;
clinkd's own pass drops them and renormalises, so their listed mass M is removed and the rest divided
by 1 - M (exact when the teacher puts no mass there outside the listed entries). The k most likely
remaining ids (ties: lower id first) are the row's indices. At temperature T the tempered distribution
is q_v ∝ p_v^(1/T) over the whole vocabulary, whose normaliser Z = K + U has a known part K (the listed
tokens) and an unknown part U = Σ p_j^(1/T) over the n_rest unlisted tokens, which hold the residual
mass r = 1 - Σ_listed p and each at most c, the probability of the last of the teacher's top tokens.
U is bounded by its two extremes: r spread uniformly over the n_rest tokens (n_rest (r/n_rest)^(1/T))
and r in chunks of c (⌊r/c⌋ c^(1/T) + (r - ⌊r/c⌋ c)^(1/T)); which one is the lower depends on whether
T < 1. The import takes log Z as the midpoint of log Z_lo and log Z_hi, the estimate with the smallest
worst-case error: every stored log-probability is within δ = ½ log(Z_hi / Z_lo) of the exact tempered
one (residual and margin within e^δ - 1). At T = 1 both extremes equal r, δ = 0 and the import is exact.
``lse`` is log Z: the log-sum-exp of the log-probabilities (taken as logits) over T, 0 at T = 1; the
loss does not read it (only indices, log-probabilities and residual; the curriculum reads the margin).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from clinkd_kernels.topk import PseudoLabels

from .store import PseudoLabelWriter, StoreError, StoreMeta

FORMATS = ("vllm",)
_LINE_ID = re.compile(r'\s*\{\s*"id"\s*:\s*')
_TOKEN_KEY = re.compile(r"-?\d+")
_SUM_SLACK = 1e-3  # log-probabilities summing over 1 + this are not a distribution (fp32 rounding stays far below)
_PREFIX_CACHE = "vLLM drops prompt log-probabilities of tokens served from its prefix cache: rerun with "
_PREFIX_CACHE += "enable_prefix_caching=False (--no-enable-prefix-caching)"


class LogprobsError(StoreError):
    """Teacher log-probabilities that cannot be imported; says which file, line, sample and position."""


@dataclass(frozen=True)
class ImportSummary:
    """What ``import_prompt_logprobs`` did: ``imported`` samples (``rows`` rows) added in this call,
    ``complete`` (every sample of the data set is in the store), and ``max_error_bound``, the largest δ
    of the imported rows (0 at temperature 1; see the module docstring)."""

    complete: bool
    imported: int
    rows: int
    max_error_bound: float


# ------------------------------------------------------------------ the data set's side


def sample_tokens(dataset, index: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of sample ``index`` of a ``ClinKDDataset``, as training sees them, without
    decoding the image (its size gives the number of placeholder tokens, as ``validate`` does)."""
    encoder, record = dataset.encoder, dataset.records[index]
    width, height = encoder.image_size(record)
    input_ids, labels = encoder.encode_text(record, encoder.image_tokens_for_size(width, height))
    return input_ids.tolist(), labels.tolist()


def supervised_positions(labels: list[int], ignore_index: int = -100) -> list[int]:
    """The positions t whose next token t + 1 is supervised: the store's rows of the sample, in order."""
    return [t for t in range(len(labels) - 1) if labels[t + 1] != ignore_index]


# ------------------------------------------------------------------ the temperature


def tempered_rows(
    top: torch.Tensor, listed: torch.Tensor, log_cap: torch.Tensor, n_rest: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tempered log-probabilities of rows known only by some of their tokens (float64).

    top [R, m]: log-probabilities (T = 1, normalised over the vocabulary) of the tokens to return;
    listed [R, n]: those of every listed token (-inf padded); log_cap [R]: the log-probability no
    unlisted token exceeds; n_rest [R]: how many tokens are unlisted. Returns (log q of ``top`` [R, m],
    log Z [R], δ [R]): log Z the midpoint of the bounds on the tempered normaliser, δ half their
    distance, so each returned log q is within δ of the exact one. Exact (δ = 0) at T = 1.
    """
    top, listed, log_cap = top.double(), listed.double(), log_cap.double()
    inv = 1.0 / float(temperature)
    n_rest = n_rest.double()
    known = torch.logsumexp(listed * inv, dim=-1)
    rest = (1.0 - listed.exp().sum(-1)).clamp_min(0.0)
    cap = log_cap.exp()
    if inv != 1.0:  # the unlisted tokens hold at most n_rest·c (more is rounding, or a wrong vocabulary size)
        rest = torch.minimum(rest, n_rest.clamp_min(0.0) * cap)
    none = (rest <= 0) | (n_rest <= 0)
    rest, n_rest = torch.where(none, 1.0, rest), torch.where(none, 1.0, n_rest)
    log_uniform = n_rest.log() + (rest.log() - n_rest.log()) * inv
    chunks = torch.floor(rest / cap)
    remainder = (rest - chunks * cap).clamp_min(0.0)
    log_chunks = torch.logaddexp(chunks.log() + log_cap * inv, remainder.log() * inv)
    if inv == 1.0:  # both extremes are the residual mass itself: exact, not just up to rounding
        log_uniform = log_chunks = rest.log()
    ninf = torch.full_like(known, float("-inf"))
    low = torch.where(none, ninf, torch.minimum(log_uniform, log_chunks))
    high = torch.where(none, ninf, torch.maximum(log_uniform, log_chunks))
    log_lo, log_hi = torch.logaddexp(known, low), torch.logaddexp(known, high)
    log_z = 0.5 * (log_lo + log_hi)
    return top * inv - log_z[:, None], log_z, 0.5 * (log_hi - log_lo)


# ------------------------------------------------------------------ one vLLM entry


def _entries(entry, where: str, teacher_vocab: int) -> dict[int, tuple[float, int | None]]:
    """A prompt_logprobs entry as token id → (logprob, rank)."""
    if entry is None:
        raise LogprobsError(f"{where} is null at a supervised row; {_PREFIX_CACHE}")
    if not isinstance(entry, dict) or not entry:
        raise LogprobsError(f"{where} must be an object token id → {{logprob, rank, decoded_token}}, got {entry!r:.80}")
    out = {}
    for key, value in entry.items():
        if not _TOKEN_KEY.fullmatch(key):
            raise LogprobsError(f"{where}: key {key!r} is not a token id")
        token = int(key)
        if not 0 <= token < teacher_vocab:
            raise LogprobsError(f"{where}: token id {token} is outside the teacher's vocabulary [0, {teacher_vocab})")
        if not isinstance(value, dict) or "logprob" not in value:
            raise LogprobsError(f"{where}[{key!r}] must be an object with a logprob, got {value!r:.80}")
        logprob, rank = value["logprob"], value.get("rank")
        if isinstance(logprob, bool) or not isinstance(logprob, (int, float)) or not math.isfinite(logprob):
            raise LogprobsError(f"{where}[{key!r}]: logprob {logprob!r} is not a finite number")
        if logprob > _SUM_SLACK:
            raise LogprobsError(f"{where}[{key!r}]: logprob {logprob!r} is above 0 (not a log-probability)")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise LogprobsError(f"{where}[{key!r}]: rank {rank!r} is not an int >= 1 or null")
        out[token] = (float(logprob), rank)
    return out


def _row(entry, target: int, where: str, *, need: int, vocab: int, teacher_vocab: int):
    """One supervised row from its entry: (top ids [need], top log-probs [need], listed in-vocabulary
    log-probs, log_cap, n_rest), conditioned on the student's vocabulary."""
    entries = _entries(entry, where, teacher_vocab)
    if target not in entries:
        raise LogprobsError(
            f"{where} does not list the prompt token {target} it predicts (vLLM always does): the "
            "log-probabilities are not aligned with the prompt"
        )
    total = sum(math.exp(lp) for lp, _ in entries.values())
    if total > 1.0 + _SUM_SLACK:
        raise LogprobsError(f"{where}: the probabilities sum to {total:.6g} > 1 (not normalised log-probabilities)")
    t_lp, t_rank = entries[target]
    others = [lp for token, (lp, _) in entries.items() if token != target]
    # The prompt token is an extra entry (not one of the top-n) when its rank says so or, without a
    # rank, when it is below every other entry (conservative: the top then ends one entry earlier).
    extra = t_rank > len(entries) if t_rank is not None else bool(others) and t_lp < min(others)
    ordered = sorted(entries.items(), key=lambda kv: (-kv[1][0], kv[0]))
    top = [(token, lp) for token, (lp, _) in ordered if not (extra and token == target)]
    top_in = [(token, lp) for token, lp in top if token < vocab][:need]
    if len(top_in) < need:
        past = sum(token >= vocab for token, _ in top)
        more = f" + {past} (ids past the student's vocabulary rank among them)" if past else ""
        if extra and t_rank is None:  # without ranks a prompt token at the bottom is taken as the extra entry
            more += f" (or {need + 1}: the entries carry no rank, so the prompt token at the bottom is not counted)"
        raise LogprobsError(
            f"{where} holds {len(top_in)} of the teacher's top tokens in the student's vocabulary "
            f"[0, {vocab}); the store needs {need}: rerun with prompt_logprobs >= {need}{more}"
        )
    outside = sum(math.exp(lp) for token, (lp, _) in entries.items() if token >= vocab)
    if outside >= 1.0 - 1e-9:
        raise LogprobsError(f"{where}: all the listed mass lies outside the student's vocabulary [0, {vocab})")
    keep = math.log1p(-outside)
    listed = [lp - keep for token, (lp, _) in entries.items() if token < vocab]
    ids, lps = zip(*top_in)
    return list(ids), [lp - keep for lp in lps], listed, top[-1][1] - keep, vocab - len(listed)


# ------------------------------------------------------------------ one sample


def _check_record(record, sample_id: str, input_ids: list[int], where: str) -> list:
    """The record's prompt_logprobs, once its id and prompt_token_ids are the data set's."""
    if not isinstance(record, dict):
        raise LogprobsError(f"{where} must be a JSON object, got {type(record).__name__}")
    for key in ("id", "prompt_token_ids", "prompt_logprobs"):
        if key not in record:
            raise LogprobsError(f"{where} has no field {key}")
    if record["id"] != sample_id:
        raise LogprobsError(f"{where}: its id {record['id']!r} is not {sample_id!r} (an id given twice on the line?)")
    ids, logprobs = record["prompt_token_ids"], record["prompt_logprobs"]
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise LogprobsError(f"{where}: prompt_token_ids must be a list of token ids")
    if ids != input_ids:
        at = next((i for i, (a, b) in enumerate(zip(ids, input_ids)) if a != b), min(len(ids), len(input_ids)))
        mine = ids[at] if at < len(ids) else "its end"
        theirs = input_ids[at] if at < len(input_ids) else "its end"
        raise LogprobsError(
            f"{where}: sample {sample_id!r}: prompt_token_ids differ from the data set's tokenisation at "
            f"position {at} (file: {mine}, data set: {theirs}; {len(ids)} vs {len(input_ids)} tokens): "
            "made with another tokenizer, chat template, image size or max_length"
        )
    if not isinstance(logprobs, list) or len(logprobs) != len(ids):
        size = len(logprobs) if isinstance(logprobs, list) else type(logprobs).__name__
        raise LogprobsError(
            f"{where}: prompt_logprobs must be a list of {len(ids)} entries (one per token), got {size}"
        )
    if logprobs[0] is not None:
        raise LogprobsError(
            f"{where}: prompt_logprobs[0] must be null (nothing predicts the first token): the list is shifted"
        )
    return logprobs


def _sample_rows(record, sample_id: str, tokens, where: str, meta: StoreMeta, teacher_vocab: int):
    """(PseudoLabels [R, k], targets [R], δ [R]) of one sample's record."""
    input_ids, labels, ignore_index = tokens
    logprobs = _check_record(record, sample_id, input_ids, where)
    need = max(meta.k, 2)
    rows = []
    for t in supervised_positions(labels, ignore_index):
        at = f"{where}: sample {sample_id!r}: prompt_logprobs[{t + 1}] (the row of position {t})"
        rows.append(
            _row(logprobs[t + 1], input_ids[t + 1], at, need=need, vocab=meta.vocab_size, teacher_vocab=teacher_vocab)
        )
    targets = torch.tensor([input_ids[t + 1] for t in supervised_positions(labels, ignore_index)], dtype=torch.int32)
    width = max((len(r[2]) for r in rows), default=1)
    ids = torch.tensor([r[0] for r in rows], dtype=torch.int64).reshape(-1, need)
    top = torch.tensor([r[1] for r in rows], dtype=torch.float64).reshape(-1, need)
    pad = [float("-inf")]
    listed = torch.tensor([r[2] + pad * (width - len(r[2])) for r in rows], dtype=torch.float64).reshape(-1, width)
    log_cap = torch.tensor([r[3] for r in rows], dtype=torch.float64)
    n_rest = torch.tensor([r[4] for r in rows], dtype=torch.float64)
    logq, log_z, bound = tempered_rows(top, listed, log_cap, n_rest, meta.temperature)
    p = logq.exp()
    labels_ = PseudoLabels(
        ids[:, : meta.k].to(torch.int32),
        logq[:, : meta.k].float(),
        log_z.float(),
        (p[:, 0] - p[:, 1]).float(),
        (1.0 - p[:, : meta.k].sum(-1)).clamp_min(0.0).float(),
    )
    return labels_, targets, bound


# ------------------------------------------------------------------ the file


def _line_id(text: str, where: str):
    """The id of a line: read from its start when it begins with "id" (vLLM lines, this module's
    script), else from the whole line; the line is parsed whole when its sample is imported."""
    match = _LINE_ID.match(text)
    try:
        if match:
            return json.JSONDecoder().raw_decode(text, match.end())[0]
        record = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise LogprobsError(f"{where} is not JSON ({e})") from None
    if not isinstance(record, dict) or "id" not in record:
        raise LogprobsError(f"{where} must be a JSON object with an id")
    return record["id"]


def _index(source: Path, ids: list[str], pending: list[str]) -> dict[str, tuple[int, int]]:
    """sample id → (byte offset, line number) of its line; LogprobsError for an id outside the data
    set, one given twice, or a pending sample without a line. Nothing is written before this passes."""
    known, index, offset = set(ids), {}, 0
    with open(source, "rb") as f:
        for number, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            where = f"{source}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LogprobsError(f"{where} is not UTF-8 ({e})") from None
            if not text.strip():
                continue
            sample_id = _line_id(text, where)
            if not isinstance(sample_id, str) or sample_id not in known:
                raise LogprobsError(f"{where}: sample {sample_id!r} is not in the data set")
            if sample_id in index:
                raise LogprobsError(
                    f"{where}: sample {sample_id!r} is given twice (first on line {index[sample_id][1]})"
                )
            index[sample_id] = (start, number)
    missing = [sid for sid in pending if sid not in index]
    if missing:
        first = ", ".join(repr(sid) for sid in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise LogprobsError(
            f"{source} has no line for {len(missing)} of the {len(pending)} samples still to import ({first})"
        )
    return index


def import_prompt_logprobs(
    source: str | os.PathLike,
    dataset,
    path: str | os.PathLike,
    meta: StoreMeta,
    *,
    teacher_vocab_size: int | None = None,
    format: str = "vllm",
    shard_size: int = 256,
    progress: bool = True,
) -> ImportSummary:
    """Import the teacher log-probabilities of ``source`` (JSON Lines in vLLM's ``prompt_logprobs``
    format, see the module docstring) for ``dataset`` (a ``ClinKDDataset``) into the store at ``path``
    with metadata ``meta``, resuming it: samples already in the store are skipped. ``teacher_vocab_size``:
    the teacher's vocabulary (default ``meta.vocab_size``); ids in [meta.vocab_size, it) are dropped as
    clinkd's own pass drops those columns. LogprobsError (a StoreError) for input that cannot be used."""
    from tqdm.auto import tqdm

    if format not in FORMATS:
        raise LogprobsError(f"format {format!r} is not one of {', '.join(FORMATS)}")
    teacher_vocab = meta.vocab_size if teacher_vocab_size is None else int(teacher_vocab_size)
    if teacher_vocab < meta.vocab_size:
        raise LogprobsError(
            f"the teacher's vocabulary ({teacher_vocab}) is smaller than the student's ({meta.vocab_size})"
        )
    source, ids = Path(source), list(dataset.ids)
    writer = PseudoLabelWriter(path, meta, ids, shard_size=shard_size)
    pending = writer.pending
    index = _index(source, ids, pending)
    position = {sid: i for i, sid in enumerate(ids)}
    ignore_index = dataset.encoder.ignore_index
    rows, bound = 0, 0.0
    bar = tqdm(total=len(ids), initial=len(ids) - len(pending), desc="importing", unit="sample", disable=not progress)
    try:
        with open(source, "rb") as f:
            for sample_id in pending:
                offset, number = index[sample_id]
                f.seek(offset)
                where = f"{source}:{number}"
                try:
                    record = json.loads(f.readline().decode("utf-8"))
                except (ValueError, RecursionError) as e:
                    raise LogprobsError(f"{where} is not JSON ({e})") from None
                tokens = (*sample_tokens(dataset, position[sample_id]), ignore_index)
                labels, targets, deltas = _sample_rows(record, sample_id, tokens, where, writer.meta, teacher_vocab)
                writer.add(sample_id, labels, targets)
                rows += targets.numel()
                bound = max(bound, float(deltas.max()) if deltas.numel() else 0.0)
                bar.update(1)
    finally:
        bar.close()
        writer.flush()  # the samples imported before a refusal are kept: a rerun resumes after them
    return ImportSummary(complete=writer.close(), imported=len(pending), rows=rows, max_error_bound=bound)
