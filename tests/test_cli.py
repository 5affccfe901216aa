"""The ``clinkd`` command table: every command's ``--help``, cheap imports, the demo command, no import circles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from clinkd.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("transformers", "accelerate", "torch")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("argv", [[]] + [[name] for name in COMMANDS] + [["distill", "cache"], ["data", "demo"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: clinkd") and (not argv or argv[-1] in out)


def test_the_command_table_names_importable_functions():
    import importlib

    for name, command in COMMANDS.items():
        module = importlib.import_module(command.module)
        assert callable(getattr(module, command.setup)) and callable(getattr(module, command.run)), name
        assert command.help, name


def test_import_and_help_load_neither_transformers_nor_torch():
    done = _python(
        "import clinkd.cli, sys; assert 'transformers' not in sys.modules; "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    done = _python(
        "import contextlib, io, sys\n"
        "from clinkd.cli import COMMANDS, main\n"
        "for argv in [[n] for n in COMMANDS] + [['distill', 'cache'], ['data', 'demo']]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv + ['--help'])\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 0, (argv, e.code)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_help_of_the_installed_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "clinkd", "train", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0 and "--preset" in done.stdout and "--no-resume" in done.stdout, done.stderr


@pytest.mark.parametrize("argv", [["train", "--preset", "demo", "--no-progress"], ["check", "--preset", "demo"]])
def test_the_demo_is_no_preset(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"clinkd {argv[0]}: error: ") and "clinkd demo" in err, err


def test_demo_arguments(monkeypatch, tmp_path, capsys):
    """``clinkd demo`` hands its options to run_demo and prints the table, the differences and the report path."""
    import clinkd.demo.pipeline as pipeline
    import clinkd.demo.report as report

    seen = {}

    def fake_run_demo(config_path=None, *, overrides=None, progress=True, resume=True):
        seen.update(config=config_path, overrides=overrides, progress=progress, resume=resume)
        return {
            "intervals": {"confidence": 0.95, "method": "m"},
            "config": {"output_dir": str(tmp_path)},
            "timings_s": {"total": 1.0},
        }

    monkeypatch.setattr(pipeline, "run_demo", fake_run_demo)
    monkeypatch.setattr(report, "score_table", lambda r: "TABLE")
    monkeypatch.setattr(report, "clear_differences", lambda r: "DIFFERENCES")
    config = tmp_path / "x.yaml"
    config.write_text("seed: 1\n")
    assert (
        main(
            [
                "demo",
                "--config",
                str(config),
                "--set",
                "seed=1",
                "--set",
                "output_dir=o",
                "--no-resume",
                "--no-progress",
            ]
        )
        == 0
    )
    assert seen == dict(config=str(config), overrides=["seed=1", "output_dir=o"], progress=False, resume=False)
    out = capsys.readouterr().out
    assert "95 % intervals (m)" in out and "TABLE" in out and "DIFFERENCES" in out
    assert f"demo report: {tmp_path}/report.md" in out


def test_demo_config_file_errors(tmp_path, capsys):
    assert main(["demo", "--config", str(tmp_path / "none.yaml"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert main(["demo", "--config", str(tmp_path / "list.yaml"), "--no-progress"]) == 2
    assert "YAML mapping" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# no import circles in the model layer (imports inside functions and lazy package names included)


def _import_graph(package: Path) -> dict[str, set[str]]:
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def absolute(module: str, name: str | None, level: int) -> str:
        base = module.split(".") if modules[module].name == "__init__.py" else module.split(".")[:-1]
        base = base[: len(base) - level + 1] if level else []
        return ".".join(base + ([name] if name else []))

    graph = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                target = absolute(module, node.module, node.level)
                targets.update(f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names)
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_exports":
                for key in node.args[1].keys:  # {module: names}, imported on first use
                    name = key.value
                    targets.add(absolute(module, name.lstrip("."), 1) if name.startswith(".") else name)
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Command":
                targets.add(node.args[0].value)  # the command table: imported when the command runs
        graph[module] = {t for t in targets if t in modules and t != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circles():
    graph = _import_graph(ROOT / "clinkd")
    assert {"clinkd.train.cli", "clinkd.eval.cli", "clinkd.demo.cli"} <= graph["clinkd.cli"]
    assert "clinkd.train.run" in graph["clinkd.train"]
    assert _cycle(graph) is None, " → ".join(_cycle(graph))


def test_no_import_circles_in_the_kernels():
    """The kernel package too: every op folder imports its shared parts (rope's rotary helpers, topk's
    PseudoLabels) one way, and nothing in it imports clinkd or transformers."""
    graph = _import_graph(ROOT / "clinkd_kernels")
    assert "clinkd_kernels.rope.kernels" in graph["clinkd_kernels.attention.fwd"]
    assert _cycle(graph) is None, " → ".join(_cycle(graph))
    for path in (ROOT / "clinkd_kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            assert not any(n.split(".")[0] in ("clinkd", "transformers") for n in names), (path, names)
