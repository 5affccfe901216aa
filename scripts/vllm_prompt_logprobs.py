"""A run's teacher log-probabilities with vLLM, as JSON Lines for ``clinkd distill import``.

On a machine with a GPU and vLLM installed (``pip install vllm``; not a clinkd dependency):

    python scripts/vllm_prompt_logprobs.py --config run.yaml --out teacher.jsonl [--stage kd]
        [--model PATH] [--prompt-logprobs N] [--batch-size 64] [--tensor-parallel-size 1] [--dtype auto]
        [--max-model-len L] [--gpu-memory-utilization 0.9]
    clinkd distill import --config run.yaml --from teacher.jsonl      # then: clinkd train --config run.yaml

Each sample of the run's data set is scored once: vLLM reads the prompt (clinkd's own tokenisation of
the whole conversation, answers included, so the rows line up with the store's) and returns, per
prompt token, its top ``--prompt-logprobs`` tokens plus the token itself (``SamplingParams(max_tokens=1,
prompt_logprobs=N)``; the one generated token is discarded). One line per sample:

    {"id": ..., "prompt_token_ids": [...],
     "prompt_logprobs": [null, {"<id>": {"logprob": ..., "rank": ..., "decoded_token": ...}, ...}, ...]}

What this script sets, and why:

* ``enable_prefix_caching=False``: vLLM versions differ in what they return for prompt tokens served from
  its prefix cache (nothing, or stale values); the import refuses null entries at supervised rows.
* ``max_logprobs``: vLLM refuses ``prompt_logprobs`` above it (default 20); it is raised to N.
* N defaults to max(k, 2) of the stage (the store keeps k per row; the margin needs the second).
  A teacher whose vocabulary is larger than the student's may rank ids past the student's vocabulary
  among its top tokens; the import drops those and then refuses a row with fewer than max(k, 2) left,
  so such a teacher wants a few more (``--prompt-logprobs``).
* Images: vLLM expands one ``<|image_pad|>`` per image itself, from the image given as
  ``multi_modal_data``. The prompt sent is clinkd's token ids with the image's run of placeholders
  collapsed to one, and vLLM's image processor is given the run processor's ``min_pixels`` /
  ``max_pixels`` (``mm_processor_kwargs``) so that it makes the same grid. The ids vLLM scored (its
  ``prompt_token_ids``, placeholders expanded) are written and compared by the import with clinkd's:
  a different image size or tokenizer is refused there, naming the sample and position; this script
  stops at the first such sample already.
* The teacher (``--model``, default the config's ``models.teacher.from_pretrained``) must be the one
  the config names: the store records the config's teacher id, and ``clinkd train`` checks it.
* vLLM's prompt log-probabilities are raw (before temperature): the import applies the stage's
  temperature (see docs/teacher.md for the approximation that needs).

An existing ``--out`` is resumed: the samples it holds are skipped, new lines appended.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run config (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--stage", help="the kd stage (default: the config's only kd stage with teacher: store)")
    parser.add_argument("--out", required=True, help="JSON Lines to write (resumed when it exists)")
    parser.add_argument("--model", help="the teacher for vLLM (default: models.teacher.from_pretrained)")
    parser.add_argument("--prompt-logprobs", type=int, help="top tokens per position (default: max(k, 2))")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per vLLM generate call")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    return parser.parse_args(argv)


def collapse_image_pads(input_ids: list[int], image_token_id: int) -> list[int]:
    """clinkd's ids with each run of image placeholders collapsed to one (vLLM expands it itself)."""
    out = []
    for i, token in enumerate(input_ids):
        if token != image_token_id or i == 0 or input_ids[i - 1] != image_token_id:
            out.append(token)
    return out


def output_line(sample_id: str, output) -> str:
    """One JSONL line from a vLLM ``RequestOutput`` (its prompt_token_ids and prompt_logprobs; entries
    are dicts token id → Logprob(logprob, rank, decoded_token), None or empty for the first token)."""
    entries = []
    for entry in output.prompt_logprobs or []:
        if not entry:
            entries.append(None)
            continue
        entries.append(
            {
                str(int(token)): {"logprob": float(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
                for token, lp in entry.items()
            }
        )
    record = {
        "id": sample_id,
        "prompt_token_ids": [int(t) for t in output.prompt_token_ids],
        "prompt_logprobs": entries,
    }
    return json.dumps(record)


def prepared_run(args):
    """(the prepared run, its kd stage) of ``--config``, checked as ``clinkd check`` checks it."""
    sys.path.insert(0, str(ROOT))
    from clinkd.train.cli import _store_stages
    from clinkd.train.config import load_config
    from clinkd.train.run import prepare_run

    config = load_config(args.config, overrides=args.overrides)
    stages = _store_stages(config, args.stage)
    if len(stages) > 1:
        raise SystemExit(f"several kd stages with teacher: store ({', '.join(s.name for s in stages)}): give --stage")
    return prepare_run(config), stages[0]


def engine(args, prepared, n: int):
    """The vLLM engine: the teacher, no prefix caching, up to n log-probabilities, the run's image sizes."""
    from vllm import LLM

    model = args.model or prepared.config.teacher.from_pretrained
    if model is None:
        raise SystemExit("the config's teacher has no from_pretrained: give --model")
    image = prepared.processor.image_processor
    pixels = {key: getattr(image, key) for key in ("min_pixels", "max_pixels") if getattr(image, key, None)}
    options = dict(max_model_len=args.max_model_len) if args.max_model_len else {}
    return LLM(
        model=model,
        tokenizer=model,
        dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=False,
        max_logprobs=max(n, 20),
        limit_mm_per_prompt={"image": 1},
        mm_processor_kwargs=pixels,
        **options,
    )


def done_ids(out: Path) -> set[str]:
    """Ids already written to ``out`` (a line cut by a killed run is dropped)."""
    if not out.exists():
        return set()
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        out.write_text("".join(lines[:-1]), encoding="utf-8")
        lines = lines[:-1]
    return {json.loads(line)["id"] for line in lines if line.strip()}


def main(argv=None) -> int:
    args = arguments(argv)
    prepared, stage = prepared_run(args)
    from vllm import SamplingParams  # vLLM only here and in engine(): the rest runs without it

    from clinkd.distill.imported import sample_tokens

    n = args.prompt_logprobs or max(int(stage.topk), 2)
    dataset, encoder = prepared.dataset, prepared.dataset.encoder
    out = Path(args.out)
    done = done_ids(out)
    todo = [i for i, sid in enumerate(dataset.ids) if sid not in done]
    llm = engine(args, prepared, n)
    params = SamplingParams(max_tokens=1, prompt_logprobs=n, temperature=1.0)
    with open(out, "a", encoding="utf-8") as f:
        for a in range(0, len(todo), args.batch_size):
            chunk = todo[a : a + args.batch_size]
            tokens = [sample_tokens(dataset, i)[0] for i in chunk]
            prompts = [
                {
                    "prompt_token_ids": collapse_image_pads(ids, encoder.image_token_id),
                    "multi_modal_data": {"image": encoder.load_image(dataset.records[i])},
                }
                for i, ids in zip(chunk, tokens)
            ]
            for i, ids, output in zip(chunk, tokens, llm.generate(prompts, params, use_tqdm=False)):
                if list(output.prompt_token_ids) != ids:
                    raise SystemExit(
                        f"sample {dataset.ids[i]!r}: vLLM scored {len(output.prompt_token_ids)} prompt tokens, "
                        f"clinkd has {len(ids)} (another image grid or tokenizer): check --model and the "
                        "processor's min_pixels / max_pixels"
                    )
                f.write(output_line(dataset.ids[i], output) + "\n")
            f.flush()
            print(f"{min(a + args.batch_size, len(todo))}/{len(todo)} samples", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
