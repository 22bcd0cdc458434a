"""The script CI runs first (`tests/scripts/readme_commands.py`): which README lines it runs, and how it
judges a command that exits and one that serves until stopped. The run itself (a fresh clone and venv, every
README command) is CI's first step (`.ci/run`), minutes long, so not part of the suite."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "scripts"))

from readme_commands import SERVERS, readme_commands, run  # noqa: E402


def test_commands_are_the_bash_blocks_logical_lines_in_order(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("\n".join([
        "# t", "```bash", "pip install -e .   # the install", "", "# a comment", "python -m a \\", "  --b c", "```",
        "```python", "print(1)", "```", "text `tensorboard --logdir runs` inline is not a command",
        "```sh", "# doc-test: skip (needs a GPU)", "nvidia-smi", "```",
    ]))
    assert readme_commands(readme) == [
        (3, "pip install -e .   # the install", None),
        (6, "python -m a    --b c", None),
        (15, "nvidia-smi", "needs a GPU"),
    ]


def test_the_readme_starts_with_its_install_line_and_runs_its_test_command():
    commands = [c for _, c, skip in readme_commands(ROOT / "README.md") if not skip]
    assert "pip install" in commands[0] and '".[dev]"' in commands[0]
    assert "python -m pytest" in commands
    assert any(c.startswith("tensorboard") for c in commands)  # a server, judged as one (SERVERS)


def _fake_server(folder: Path, body: str) -> dict[str, str]:
    """A `tensorboard` on PATH that runs ``body``."""
    (folder / "tensorboard").write_text(f"#!/usr/bin/env bash\n{body}\n")
    (folder / "tensorboard").chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_a_command_passes_by_its_exit_status_and_a_server_by_still_serving(tmp_path):
    env = dict(os.environ)
    log = tmp_path / "log"
    assert run("true && echo done", tmp_path, env, log, timeout=30, serve_seconds=1) is None
    assert run("true && exit 3", tmp_path, env, log, timeout=30, serve_seconds=1) == "exit status 3"
    assert run("sleep 30", tmp_path, env, log, timeout=1, serve_seconds=1) == "still running after 1 s"
    assert "tensorboard" in SERVERS
    serving = _fake_server(tmp_path, "echo serving; sleep 60")
    assert run("tensorboard --logdir runs", tmp_path, serving, log, timeout=30, serve_seconds=1) is None
    assert "serving" in log.read_text()
    stopped = _fake_server(tmp_path, "echo port in use; exit 1")
    why = run("tensorboard --logdir runs", tmp_path, stopped, log, timeout=30, serve_seconds=5)
    assert why is not None and why.startswith("exited (1)")


def _marked_trl(decorators: list) -> bool:
    import ast

    return any("mark.trl" in ast.unparse(d) for d in decorators)


def test_every_test_that_needs_trl_is_marked_so_ci_runs_it_after_installing_it():
    """CI's README step has no TRL (those tests skip); its extras step runs `-m trl`: an unmarked TRL test
    would run nowhere."""
    import ast

    unmarked = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_marked = any(
            isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
            and "mark.trl" in ast.unparse(n.value) for n in tree.body
        )
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                uses = any(isinstance(c, ast.Call) and "importorskip" in ast.unparse(c.func)
                           and "trl" in ast.unparse(c.args[0] if c.args else c) for c in ast.walk(node))
                if uses and not (module_marked or _marked_trl(node.decorator_list)):
                    unmarked.append(f"{path.relative_to(ROOT)}::{node.name}")
        top = [n for n in tree.body if isinstance(n, ast.Assign | ast.Expr)]
        if any("importorskip" in ast.unparse(n) and "trl" in ast.unparse(n) for n in top) and not module_marked:
            unmarked.append(str(path.relative_to(ROOT)))
    assert not unmarked, f"needs TRL but is not marked @pytest.mark.trl: {unmarked}"
