"""The user documentation in docs/ is executable and agrees with the code.

* Every ```python block of docs/*.md runs; a page's blocks run in order in one fresh namespace, so a
  page may build on its earlier blocks. A block fenced as ```python no-run is skipped (GPU-only code).
* docs/examples/run.yaml is a valid run config for the package's own parser, names every key the
  parser accepts, and passes every check ``clinkd check`` makes (on a tiny generated data set).
* Every dotted ``clinkd…`` / ``clinkd_kernels…`` name written in backticks in the docs exists, and every
  link between the pages (file and heading) resolves.
* The docs index lists every page, and no tracked file refers to documents users never see.
* Every name a package exports (``__all__`` of ``clinkd`` and ``clinkd_kernels``) is described in
  docs/api.md, and README.md stays a short read that keeps the two quick-start commands and valid links.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLE = DOCS / "examples" / "run.yaml"
PAGES = sorted(DOCS.glob("*.md"))

FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """(line number, code) of each runnable python block of ``page``."""
    text = page.read_text(encoding="utf-8")
    out = []
    for match in FENCE.finditer(text):
        if "no-run" in match.group(1):
            continue
        out.append((text.count("\n", 0, match.start()) + 2, match.group(2)))
    return out


RUNNABLE = [p for p in PAGES if python_blocks(p)]


def test_docs_exist():
    assert (DOCS / "README.md").is_file()
    assert EXAMPLE.is_file()
    assert RUNNABLE, "no runnable python block found in docs/*.md"


@pytest.mark.parametrize("page", RUNNABLE, ids=[p.name for p in RUNNABLE])
def test_page_examples_run(page, tmp_path, monkeypatch):
    """The page's python blocks, in order, in one namespace, from a scratch working directory."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.stem}"}
    for line, code in python_blocks(page):
        # Padding with blank lines makes tracebacks point at the block's line in the Markdown file.
        exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)


def test_index_lists_every_page():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    for page in PAGES:
        if page.name != "README.md":
            assert f"({page.name})" in index, f"docs/README.md does not link {page.name}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    """The anchors of the headings of a Markdown file."""
    return {_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", page.read_text(encoding="utf-8"), re.M)}


def test_links_between_pages_resolve():
    anchors = {page.name: _anchors(page) for page in PAGES}
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            name = path or page.name
            if path and not (DOCS / path).exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and name.endswith(".md") and anchor not in anchors.get(name, ()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# ---------------------------------------------------------------------------------------------------
# the API reference and the README

API = DOCS / "api.md"
README = ROOT / "README.md"
README_LIMIT = 10 * 1024  # bytes: a newcomer reads it in five minutes; everything else is in docs/
# The two quick-start commands, exactly as users type them and CI runs them (.ci/run).
QUICK_START = (
    "bash scripts/install.sh demo && .venv/bin/clinkd demo",
    "bash scripts/install.sh test && .venv/bin/python -m pytest tests/ -q",
)


def _written_in_backticks(name: str, package: str, text: str) -> bool:
    """``name`` in backticks in ``text``: bare (`name`) or dotted (`package.name`, `package.sub.name`)."""
    dotted = re.escape(package) + r"(?:\.[A-Za-z_][A-Za-z0-9_]*)*\."
    return re.search(rf"`(?:{dotted})?{re.escape(name)}`", text) is not None


@pytest.mark.parametrize("package", ["clinkd", "clinkd_kernels"])
def test_every_exported_name_is_documented(package):
    exported = importlib.import_module(package).__all__
    text = API.read_text(encoding="utf-8")
    missing = [name for name in exported if not _written_in_backticks(name, package, text)]
    assert not missing, f"docs/api.md does not describe these names of {package}.__all__: {missing}"


def test_readme_is_a_five_minute_read():
    data = README.read_bytes()
    assert len(data) <= README_LIMIT, (
        f"README.md is {len(data)} bytes, over {README_LIMIT}: move details into docs/ and link them"
    )
    lines = data.decode("utf-8").splitlines()
    for command in QUICK_START:
        assert command in lines, f"README.md no longer has the quick-start command line {command!r}"


def test_readme_links_resolve():
    broken = []
    for target in LINK.findall(README.read_text(encoding="utf-8")):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path if path else README
        if not file.exists():
            broken.append(f"README.md: {target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"README.md: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# ---------------------------------------------------------------------------------------------------
# the example run config


def _allowed_keys(mapping: dict, where: list, message_where: str) -> list[str]:
    """The keys the parser accepts at ``where`` (a path of keys / list indices into ``mapping``),
    read from the error it raises for an unknown key there."""
    import copy

    from clinkd.train import ConfigError, parse_config

    probe = copy.deepcopy(mapping)
    node = probe
    for key in where:
        node = node[key]
    node["zz_not_a_key"] = 1
    with pytest.raises(ConfigError) as info:
        parse_config(probe, base_dir=EXAMPLE.parent)
    message = str(info.value)
    assert message_where in message and "zz_not_a_key" in message, message
    assert "allowed:" in message, f"the parser's message no longer lists the allowed keys: {message}"
    return [k.strip() for k in message.split("allowed:", 1)[1].split(",")]


def _example_mapping() -> dict:
    import yaml

    mapping = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert isinstance(mapping, dict)
    return mapping


def test_example_config_names_every_key():
    mapping = _example_mapping()
    text = EXAMPLE.read_text(encoding="utf-8")
    kd = next(i for i, s in enumerate(mapping["stages"]) if s["type"] == "kd")
    sft = next(i for i, s in enumerate(mapping["stages"]) if s["type"] == "sft")
    rct = next(i for i, s in enumerate(mapping["stages"]) if s["type"] == "rct")
    locations = [
        ([], "config:"),
        (["models"], "config.models:"),
        (["models", "student"], "config.models.student:"),
        (["models", "teacher"], "config.models.teacher:"),
        (["models", "student", "patch"], "config.models.student.patch:"),
        (["models", "student", "patch", "mcg_rope"], "config.models.student.patch.mcg_rope:"),
        (["data"], "config.data:"),
        (["processor"], "config.processor:"),
        (["processor", "offline"], "config.processor.offline:"),
        (["stages", kd], f"config.stages[{kd}]:"),
        (["stages", sft], f"config.stages[{sft}]:"),
        (["stages", kd, "curriculum"], f"config.stages[{kd}].curriculum:"),
        (["stages", rct], f"config.stages[{rct}]:"),
        (["stages", rct, "similarity"], f"config.stages[{rct}].similarity:"),
    ]
    for where, message_where in locations:
        for key in _allowed_keys(mapping, where, message_where):
            # as a block or flow-mapping key, or as a commented-out alternative ("# from_pretrained: ...")
            assert re.search(rf"(?:^|[{{,#-])\s*{re.escape(key)}:", text, re.M), (
                f"docs/examples/run.yaml does not show the key {key!r} of {message_where.rstrip(':')}"
            )


def test_example_config_parses_and_passes_the_checks(tmp_path):
    from clinkd.demo import build_demo_data
    from clinkd.train import load_config, prepare_run

    data = build_demo_data(tmp_path / "data", train_per_modality=1, test_per_modality=1)
    config = load_config(
        EXAMPLE, overrides=[f"data.train={data / 'train.jsonl'}", f"data.root={data}", f"output_dir={tmp_path / 'run'}"]
    )
    assert [s.type for s in config.stages] == ["kd", "sft", "rct"]
    assert config.stages[2].rct.template == config.stages[2].rct.template.replace("\\n", "\n")  # real newlines
    assert config.student.patch is not None and config.teacher is not None
    assert Path(config.output_dir) == tmp_path / "run"
    prepared = prepare_run(config)  # what `clinkd check` runs: processor, every record, model configs
    assert len(prepared.dataset) == 20
    assert set(prepared.model_configs) == {"student", "teacher"}


def test_example_config_runs_end_to_end(tmp_path):
    """The example, copied beside a tiny data set (its relative paths then resolve there), trains every
    stage: pseudo-label store, KD with the curriculum (one step), SFT (one step), then two RCT rounds
    (an epoch each)."""
    import json

    from clinkd.demo import build_demo_data
    from clinkd.train import load_config, run_training

    build_demo_data(tmp_path / "demo_data", train_per_modality=1, test_per_modality=1)
    shutil.copy(EXAMPLE, tmp_path / "run.yaml")
    config = load_config(tmp_path / "run.yaml", overrides=["training.max_steps=1", "training.save_steps=1000"])
    results = run_training(config, progress=False)
    assert list(results) == ["kd", "sft", "rct"]
    assert [r["round"] for r in results["rct"]["rounds"]] == [1, 2]
    for stage in ("kd", "sft", "rct"):
        assert (Path(results[stage]["final"]) / "config.json").is_file()
    manifest = json.loads((Path(config.store_path(config.stages[0])) / "manifest.json").read_text())
    assert manifest["complete"] and manifest["meta"]["k"] == config.stages[0].topk


# ---------------------------------------------------------------------------------------------------
# names and references


NAME = re.compile(r"`(clinkd(?:_kernels)?(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def _resolve(name: str):
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def test_names_in_the_docs_exist():
    missing = []
    for page in PAGES:
        for name in sorted(set(NAME.findall(page.read_text(encoding="utf-8")))):
            try:
                _resolve(name)
            except (ImportError, AttributeError) as e:
                missing.append(f"{page.name}: {name} ({type(e).__name__}: {e})")
    assert not missing, "\n".join(missing)


# The documents users never see, spelled so that this file does not itself name them.
_HIDDEN = re.compile(
    r"\b(?:" + "|".join(("DES" + "IGN", "PAP" + "ER", "G" + "PU")) + r")\.md\b|" + "shared" + r"\s+" + "notes", re.I
)
# Tracked files allowed to keep such a reference (none).
ALLOWED_REFERENCES: list[str] = []


def test_docs_refer_to_nothing_users_cannot_read():
    bad = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in sorted(DOCS.rglob("*"))
        if p.is_file()
        for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if _HIDDEN.search(line)
    ]
    assert not bad, bad


def test_repository_refers_to_nothing_users_cannot_read():
    try:
        listed = subprocess.run(
            ["git", "ls-files", "*.py", "*.md", "*.sh", "*.toml"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    bad = []
    for rel in listed:
        path = ROOT / rel
        if rel.startswith("docs/") or rel in ALLOWED_REFERENCES or not path.is_file():
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if _HIDDEN.search(line):
                bad.append(f"{rel}:{n}: {line.strip()[:100]}")
    assert not bad, f"{len(bad)} line(s) refer to documents outside the repository:\n" + "\n".join(bad)
