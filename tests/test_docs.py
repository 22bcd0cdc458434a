"""Every fenced code block of README.md and docs/*.md runs (or parses) here, so examples cannot rot.

One test per block, named ``<file>-<n>`` (n counts the file's fenced blocks from 1, any language):

- ``python``: executed. A file's python blocks run in order in one namespace (block 3 may use
  names from blocks 1 and 2; selecting a single block runs the earlier ones first), in a
  temporary working directory of that file, with ``HF_HUB_OFFLINE=1``.
- ``yaml``: parsed; a recipe fragment (a mapping with a top-level ``trainer``, ``model``, ``data``,
  ... key) is parsed through the real CLI on top of ``recipes/tiny.yaml``, as
  ``--config recipes/tiny.yaml --config fragment``.
- ``bash`` / ``sh`` / ``shell``: every ``python -m dpo_lightning ...`` command (also behind
  ``torchrun -m``, ``srun``, ``time``) is checked in-process from the repository root: ``--help``
  and ``--print_config`` commands run; ``fit``/``validate``/``test``, ``generate`` and ``iterate``
  commands are parsed through the real CLI (every option checked against the signatures) but nothing
  trains or samples. Other commands
  (``pip``, ``pytest``, ...) are not run; a block with nothing else is skipped, with the reason.
- ``json``: parsed (a sequence of JSON values); rows with a known column layout are validated by
  ``dpo_lightning.data.formats.to_example``.
- ``text``, ``console``, ``math`` and blocks without a language: output samples, diagrams and
  formulas: skipped.

A block that cannot run here says so inside itself, on a comment line, with the reason::

    # doc-test: skip (needs a GPU)
    # doc-test: skip (needs a hub download: meta-llama/Llama-2-7b-hf)

or, for a block without comments (json), on an HTML comment line right above its fence:
``<!-- doc-test: skip (reason) -->``. The reason is required.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import shlex
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TINY = ROOT / "recipes" / "tiny.yaml"

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")
SKIP_MARK = re.compile(r"doc-test:\s*skip\s*\((?P<reason>.+)\)")  # the reason runs to the line's last ")"
HTML_SKIP = re.compile(r"^\s*<!--\s*doc-test:\s*skip\s*\((?P<reason>.+)\)\s*-->\s*$")
LANGS = {"py": "python", "python3": "python", "sh": "bash", "shell": "bash", "yml": "yaml", "jsonl": "json"}
# Top-level keys of `python -m dpo_lightning fit` configs: a YAML mapping with any of them is a recipe fragment
# (and goes through the CLI whole, so a misspelled key beside them fails).
RECIPE_KEYS = {"seed_everything", "trainer", "model", "data", "checkpoint", "nonfinite", "export", "lr_monitor",
               "optimizer", "lr_scheduler", "ckpt_path"}
CLI_SUBCOMMANDS = {"fit", "validate", "test", "predict"}


class Block(NamedTuple):
    path: Path
    index: int  # 1-based among the file's fenced blocks
    lang: str  # normalised: python, bash, yaml, json, text, ... ("" without a language)
    line: int  # 1-based line of the first line of code
    code: str
    skip: str | None  # the reason of a doc-test skip marker

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}-{self.index}"


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order (indented fences inside lists included)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        info = m["info"].split()[0].lower() if m["info"].strip() else ""
        lang = LANGS.get(info, info)
        above = HTML_SKIP.match(lines[i - 1]) if i > 0 else None
        start, j = i + 1, i + 1
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        code = "\n".join(line[indent:] if line[:indent].strip() == "" else line for line in lines[start:j]) + "\n"
        inner = SKIP_MARK.search(code)
        skip = inner["reason"] if inner else above["reason"] if above else None
        blocks.append(Block(path, len(blocks) + 1, lang, start + 1, code, skip))
        i = j + 1
    return blocks


ALL_BLOCKS = [b for path in DOC_FILES for b in fenced_blocks(path)]


def test_every_doc_file_is_collected():
    assert {p.name for p in DOC_FILES} >= {"README.md", "guide.md", "losses.md"}
    assert ALL_BLOCKS, "no fenced code blocks found"


def test_the_fence_parser(tmp_path):
    """Languages, indented fences, skip markers and line numbers, on a hand-made file."""
    path = tmp_path / "t.md"
    path.write_text("\n".join([
        "# t", "```python", "x = 1", "```", "- item", "  ```yaml", "  a: 1", "  ```",
        "<!-- doc-test: skip (no such file) -->", "```json", "{}", "```", "````", "```inner", "````",
        "```bash", "# doc-test: skip (needs a GPU (80 GB))", "nvidia-smi", "```",
    ]))
    got = [(b.index, b.lang, b.line, b.code, b.skip) for b in fenced_blocks(path)]
    assert got == [
        (1, "python", 3, "x = 1\n", None),
        (2, "yaml", 7, "a: 1\n", None),
        (3, "json", 11, "{}\n", "no such file"),
        (4, "", 14, "```inner\n", None),
        (5, "bash", 17, "# doc-test: skip (needs a GPU (80 GB))\nnvidia-smi\n", "needs a GPU (80 GB)"),
    ]


# ------------------------------------------------------------------------------------------------ python


class _FileState:
    """One namespace per Markdown file, and how far its python blocks have run."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.namespace: dict = {"__name__": "__doc_test__"}
        self.done: set[int] = set()
        self.failed: list[int] = []


_STATES: dict[Path, _FileState] = {}


def _exec(block: Block, state: _FileState) -> None:
    # Leading newlines make traceback line numbers those of the Markdown file.
    code = compile("\n" * (block.line - 1) + block.code, str(block.path), "exec")
    exec(code, state.namespace)  # noqa: S102 - the point of this test


def _run_python(block: Block, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _STATES.get(block.path)
    if state is None:
        state = _STATES[block.path] = _FileState(tmp_path_factory.mktemp(block.path.stem))
    monkeypatch.chdir(state.cwd)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    earlier = [b for b in ALL_BLOCKS if b.path == block.path and b.lang == "python" and b.index < block.index]
    for b in earlier:  # what this block may depend on, when it was selected alone
        if b.index not in state.done and not b.skip:
            try:
                _exec(b, state)
            except Exception:
                state.failed.append(b.index)
            finally:
                state.done.add(b.index)
    try:
        _exec(block, state)
    except Exception as e:
        state.failed.append(block.index)
        earlier_failed = [i for i in state.failed if i < block.index]
        if earlier_failed and hasattr(e, "add_note"):
            e.add_note(f"(python block(s) {earlier_failed} of {block.path.name} failed before this one, "
                       "which runs in the same namespace)")
        raise
    finally:
        state.done.add(block.index)


def _imported_and_used(code: str) -> tuple[set[str], set[str]]:
    """The names a block imports (or defines), and the names it reads."""
    tree = ast.parse(code)
    bound, used = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            bound.add(node.name)
    return bound, used


PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "python" and not b.skip]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"{b.path.name}:{b.line}" for b in PYTHON_BLOCKS])
def test_a_python_block_imports_what_it_uses(block):
    """A block pasted on its own (user trial 2): it may use the variables of the blocks before it, but not an
    import of theirs, which a reader copying this block alone would lack (a NameError)."""
    earlier_imports = set()
    for b in PYTHON_BLOCKS:
        if b.path == block.path and b.index < block.index:
            for node in ast.walk(ast.parse(b.code)):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    earlier_imports |= {(a.asname or a.name).split(".")[0] for a in node.names}
    bound, used = _imported_and_used(block.code)
    missing = sorted((used - bound) & earlier_imports)
    assert not missing, f"{block.path.name}:{block.line} uses {missing}, imported only by an earlier block"


# ------------------------------------------------------------------------------------------------ the CLI


def _parse_only_cli():
    from dpo_lightning.cli import DPOLightningCLI

    class ParseOnlyCLI(DPOLightningCLI):
        """Parses and validates against every signature; builds, claims and runs nothing."""

        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

        def _run_subcommand(self, subcommand: str) -> None:
            pass

    return ParseOnlyCLI


def _cli(args: list[str], *, parse_only: bool) -> str:
    """Run the CLI in-process; its stdout. A non-zero exit fails the test with the CLI's message."""
    from dpo_lightning.cli import cli_main, main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    environ = dict(os.environ)  # the CLI seeds (PL_GLOBAL_SEED): leave no trace for later tests
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if parse_only:
                cli_main(args, cli_class=_parse_only_cli())
            else:
                main(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            os.environ.clear()
            os.environ.update(environ)
    if code != 0:
        message = err.getvalue()
        message = message[message.find("error:"):] if "error:" in message else message[-3000:]
        pytest.fail(f"`python -m dpo_lightning {shlex.join(args)}` exited {code}:\n{message}")
    return out.getvalue()


def _dpo_lightning_args(tokens: list[str]) -> list[str] | None:
    """The arguments after ``-m dpo_lightning`` / ``dpo-lightning`` in a command, or None."""
    for i, token in enumerate(tokens):
        if token == "-m" and i + 1 < len(tokens) and tokens[i + 1] == "dpo_lightning":
            return tokens[i + 2:]
        if token in ("dpo-lightning", "dpo_lightning"):
            return tokens[i + 1:]
    return None


def _commands(code: str) -> list[list[str]]:
    """Logical shell commands (continuation lines joined, comments dropped), each split into words."""
    joined = re.sub(r"\\\n", " ", code)
    commands = []
    for line in joined.splitlines():
        for part in re.split(r"&&|;|\|\|", line):
            words = shlex.split(part, comments=True)
            if words:
                commands.append(words)
    return commands


def _parse_generate_or_iterate(args: list[str]) -> None:
    """``generate``/``iterate`` commands parsed as their CLIs parse them (every option and recipe key checked
    against the signatures); nothing is built, sampled or trained, so the files they name need not exist."""
    from dpo_lightning.cli import GenerateCLI, generate_main

    class ParseOnlyGenerateCLI(GenerateCLI):
        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

        def _run_subcommand(self, subcommand: str) -> None:
            pass

    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            if args[0] == "generate":
                generate_main(args[1:], cli_class=ParseOnlyGenerateCLI)
            else:
                from jsonargparse import ActionConfigFile, ArgumentParser

                from dpo_lightning.pipeline import iterate

                parser = ArgumentParser(exit_on_error=False)
                parser.add_argument("--config", action=ActionConfigFile)
                parser.add_function_arguments(iterate, as_positional=False)
                parser.parse_args(args[1:])
    except (SystemExit, Exception) as e:  # noqa: BLE001 - the parser's message is the test's failure
        pytest.fail(f"`python -m dpo_lightning {shlex.join(args)}` does not parse: {e}\n{err.getvalue()[-2000:]}")


def _check_cli_command(args: list[str]) -> None:
    if any(a in ("-h", "--help") for a in args):
        assert "usage" in _cli(args, parse_only=False).lower()
    elif "--print_config" in args or any(a.startswith("--print_config=") for a in args):
        printed = _cli(args, parse_only=False)
        assert isinstance(yaml.safe_load(printed), dict), printed[:500]
    elif args and args[0] in CLI_SUBCOMMANDS:
        _cli(args, parse_only=True)  # every option checked; nothing built or trained
    elif args and args[0] in ("generate", "iterate"):
        _parse_generate_or_iterate(args)
    else:
        pytest.skip(f"`dpo_lightning {shlex.join(args[:2])}` needs real inputs (not --help/--print_config)")


def _run_bash(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # documented commands use paths relative to the repository root
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cli = [args for words in _commands(block.code) if (args := _dpo_lightning_args(words)) is not None]
    if not cli:
        first = " ".join(_commands(block.code)[0][:3]) if _commands(block.code) else "nothing"
        pytest.skip(f"no `python -m dpo_lightning` command (starts with `{first}`): not run by the doc tests")
    for args in cli:
        _check_cli_command(args)


def _run_yaml(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = yaml.safe_load(block.code)
    if not isinstance(data, dict) or not set(data) & RECIPE_KEYS:
        return  # plain YAML: parsing it was the test
    fragment = tmp_path / "fragment.yaml"
    fragment.write_text(block.code)
    monkeypatch.chdir(tmp_path)
    _cli(["fit", "--config", str(TINY), "--config", str(fragment)], parse_only=True)


def _run_json(block: Block) -> None:
    from dpo_lightning.data.errors import RowRef
    from dpo_lightning.data.formats import LAYOUT_COLUMNS, detect_layout, to_example

    decoder, text, pos, values = json.JSONDecoder(), block.code, 0, []
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            break
        value, pos = decoder.raw_decode(text, pos)
        values.append(value)
    assert values, "empty json block"
    layouts = {frozenset(cols) for cols in LAYOUT_COLUMNS.values()}
    for i, row in enumerate(values):
        if isinstance(row, dict) and frozenset(row) in layouts:
            to_example(row, detect_layout(list(row), block.name), RowRef(block.name, "doc", i))


# ------------------------------------------------------------------------------------------------ the test


@pytest.mark.parametrize("block", [pytest.param(b, id=b.name) for b in ALL_BLOCKS])
def test_doc_block(block: Block, tmp_path_factory, tmp_path, monkeypatch):
    if block.skip:
        pytest.skip(f"marked in the document: {block.skip}")
    if block.lang == "python":
        _run_python(block, tmp_path_factory, monkeypatch)
    elif block.lang == "bash":
        _run_bash(block, monkeypatch)
    elif block.lang == "yaml":
        _run_yaml(block, tmp_path, monkeypatch)
    elif block.lang == "json":
        _run_json(block)
    elif block.lang in ("", "text", "console", "output", "math"):
        pytest.skip(f"{'a `' + block.lang + '` block' if block.lang else 'no language'}: an output sample, diagram "
                    "or formula, not code")
    else:
        pytest.fail(f"no doc-test runner for ```{block.lang} blocks: add one to tests/test_docs.py, or mark it")


def test_markers_give_a_reason():
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"doc-test:[^\n]*", text):
            assert SKIP_MARK.search(m.group(0)), f"{path.name}: malformed marker {m.group(0)!r}"

