"""docs/migrating_from_trl.md, row by row (issue #25: "every row tried and true").

- Every dpo_lightning key a row names (`model.*`, `data.*`, `trainer.*`, `checkpoint.*`, `seed_everything`,
  `ckpt_path`) parses through the real CLI (parse-only, on the defaults of the row's stage: DPO, SFT or the
  reward model), with each value the row gives (`model.lr_decay: linear \\| cosine \\| constant`: each one),
  and the parsed config holds it.
- Where a row states our default (the first word of its last column: a number, `True`/`False`/`None`, a
  backticked value, or "same", which is TRL's default from the column before), the CLI's default is that.
- TRL's side (marked `trl`): each `DPOConfig`/`SFTConfig`/`RewardConfig` name a row gives is a field of
  TRL 1.16's config, or gone where the row says "removed in 1.x", with the default the row states.
- The CLI's hints for TRL names (`config_errors.TRL_OPTIONS`) say what the rows say, for every TRL name of a
  row that names a key here; a row that says "not supported" (or "not needed") has a refusal hint that says so
  (`config_errors.TRL_REFUSED`), through the real CLI; a TRL name is matched exactly, never taken for another.
- (marked `trl`) every option of TRL 1.16's `DPOConfig` (beyond transformers' `TrainingArguments`) has a row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

from dpo_lightning.cli.config_errors import TRL_OPTIONS, TRL_REFUSED

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "migrating_from_trl.md"
KEY = re.compile(r"`(?:--)?((?:model|data|trainer|checkpoint)\.[\w.]+|seed_everything|ckpt_path)(?::\s*|\s+)?([^`]*)`")
STAGES = {
    "dpo": ["--model.class_path", "dpo_lightning.DPOModule", "--data.class_path", "dpo_lightning.PreferenceDataModule"],
    "sft": ["--model.class_path", "dpo_lightning.SFTModule", "--data.class_path", "dpo_lightning.SFTDataModule"],
    "rm": ["--model.class_path", "dpo_lightning.RewardModule", "--data.class_path",
           "dpo_lightning.PreferenceDataModule"],
}
# What a parse needs besides the defaults: data, and an optimizer class so its init_args keys resolve (the
# default without one, AdamW(lr=1e-6), is read from the stage itself: _fallback_lr).
BASE = ["--data.dataset", "synthetic:sort", "--data.tokenizer", "synthetic:sort",
        "--model.optimizer", "torch.optim.AdamW"]


class Row(NamedTuple):
    line: int
    cells: list[str]
    stage: str  # dpo, sft or rm: which stage's options the row's keys belong to

    @property
    def name(self) -> str:
        return f"line {self.line}: {self.cells[0][:50]}"

    @property
    def keys(self) -> list[tuple[str, list[str]]]:
        """(key, values) for each key of the dpo_lightning column; values: the alternatives given, or []."""
        out = []
        for m in KEY.finditer(self.cells[2 if len(self.cells) == 4 else 1]):
            value = m.group(2)
            out.append((m.group(1), [v.strip() for v in re.split(r"\s*\\\|\s*", value)] if value else []))
        return out


def rows() -> list[Row]:
    """The two tables' body rows; the second table's rows from `RewardTrainer` on are the reward model's."""
    out, stage = [], "dpo"
    for n, line in enumerate(DOC.read_text().splitlines(), start=1):
        if line.startswith("## From SFTTrainer"):
            stage = "sft"
        if not line.startswith("| ") or line.startswith(("| TRL", "|---")):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if stage != "dpo" and cells[0].startswith(("`RewardTrainer`", "`RewardConfig")):
            stage = "rm"
        out.append(Row(n, cells, stage))
    return out


ROWS = rows()


def _parse(stage: str, args: list[str]):
    """The `fit` config of the real CLI, parse-only; a failure fails the test with the CLI's message."""
    from test_docs import _parse_only_cli

    from dpo_lightning.cli import cli_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli = cli_main(["fit", *STAGES[stage], *BASE, *args], cli_class=_parse_only_cli())
        except SystemExit:
            pytest.fail(f"fit {' '.join(args)}: {err.getvalue().strip()}")
    return cli.config.fit


_DEFAULTS: dict[str, object] = {}


def defaults(stage: str):
    if stage not in _DEFAULTS:
        _DEFAULTS[stage] = _parse(stage, [])
    return _DEFAULTS[stage]


def resolve(config, key: str):
    """The value at a doc key (``model.beta``: ``model.init_args.beta``; through None option groups to the
    group class's own default); KeyError when the config has no such option."""
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if node is None:  # an option group left at None: its dataclass's field default
            return _group_default(config, parts[:i], part)
        init = node.get("init_args") if hasattr(node, "get") and "class_path" in node else None
        if hasattr(node, "get") and part in node:
            node = node[part]
        elif init is not None and part in init:
            node = init[part]
        else:
            raise KeyError(key)
    return node


def _group_default(config, group: list[str], field: str):
    import inspect
    import typing

    from dpo_lightning.cli.fit import _import

    cls = _import(config.model.class_path) if group[0] == "model" else _import(config.data.class_path)
    for klass in cls.__mro__:
        hints = typing.get_type_hints(klass.__init__) if "__init__" in vars(klass) else {}
        if group[-1] in hints:
            option = next(t for t in typing.get_args(hints[group[-1]]) if dataclasses.is_dataclass(t))
            return {f.name: f.default for f in dataclasses.fields(option)}[field]
    raise KeyError(".".join([*group, field]), inspect.signature(cls))


def _same_class(a: str, b: str) -> bool:
    from dpo_lightning.cli.fit import _import

    try:
        return _import(a) is _import(b)
    except (ImportError, AttributeError, ValueError):
        return False


def _same(actual, documented) -> bool:
    """Whether a parsed value is the documented one (a dict: the keys it gives; a class: the same class)."""
    actual = actual.as_dict() if hasattr(actual, "as_dict") else actual
    if isinstance(documented, list) and len(documented) == 1 and not isinstance(actual, list | tuple):
        documented = documented[0]  # TRL's ["sigmoid"] is our "sigmoid"
    if isinstance(documented, dict):
        if not isinstance(actual, dict):
            return False
        if "class_path" in documented:
            return _same_class(actual.get("class_path", ""), documented["class_path"]) and _same(
                actual.get("init_args") or {}, documented.get("init_args") or {})
        return all(k in actual and _same(actual[k], v) for k, v in documented.items())
    if isinstance(documented, list):
        return isinstance(actual, list | tuple) and len(actual) == len(documented) and all(
            _same(a, d) for a, d in zip(actual, documented))
    if isinstance(documented, bool) or documented is None:
        return actual is documented
    if isinstance(documented, float | int):
        return isinstance(actual, float | int) and not isinstance(actual, bool) and actual == pytest.approx(documented)
    if isinstance(documented, str) and isinstance(actual, str) and actual != documented and "." in documented:
        return _same_class(actual, documented)
    return actual == documented


def _value(text: str):
    """A documented value: YAML, with 1e-6 read as a number (YAML 1.1 wants 1.0e-6)."""
    if text == "None":
        return None
    try:
        return float(text) if re.fullmatch(r"[-+]?\d+(\.\d*)?e[-+]?\d+", text) else yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _literal(cell: str):
    """The default a cell states by its first word, or ``...`` when it states none."""
    m = re.match(r"(same|`[^`]+`|[-+\d.e]+|True|False|None)(?=[\s,;:)]|$)", cell)
    return ... if not m else _value(m.group(1).strip("`"))


KEYED = [r for r in ROWS if r.keys]


def test_the_tables_are_read():
    assert len(ROWS) >= 50 and len(KEYED) >= 35
    assert {r.stage for r in ROWS} == {"dpo", "sft", "rm"}


def _settings(stage: str) -> list[tuple[Row, str, str]]:
    """(row, key, value) for every key of the stage's rows: the row's value (each alternative), or for a key
    alone its default (its existence is checked as it is resolved), so that it parses back."""
    out = []
    for row in (r for r in KEYED if r.stage == stage):
        for key, values in row.keys:
            if not values:
                value = resolve(defaults(stage), key)  # KeyError: the CLI has no such option
                value = value.as_dict() if hasattr(value, "as_dict") else value
                if value is None:  # (jsonargparse takes no null for a field of an option group on the command line)
                    continue
                values = [yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()]
            out += [(row, key, v) for v in values]
    return out


def _runs(settings: list[tuple[Row, str, str]]) -> list[list[tuple[Row, str, str]]]:
    """Few CLI parses holding every setting: one key (or a key and its sub-keys) once per parse, a class_path
    on its own (a stage takes other options)."""
    runs: list[list[tuple[Row, str, str]]] = []
    for item in settings:
        key = item[1]
        alone = key.endswith("class_path")
        for run in runs:
            clash = any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for _, k, _ in run)
            if not clash and not alone and not any(k.endswith("class_path") for _, k, _ in run):
                run.append(item)
                break
        else:
            runs.append([item])
    return runs


@pytest.mark.parametrize("stage", ["dpo", "sft", "rm"])
def test_every_key_parses_with_the_values_the_rows_give(stage: str):
    settings = _settings(stage)
    assert settings
    for run in _runs(settings):
        args = [a for _, key, value in run for a in (f"--{key}", value)]
        config = _parse(stage, args)
        for row, key, value in run:
            if key == "ckpt_path":
                continue  # `last` is resolved to a file, or to None with a warning when there is none
            actual = resolve(config, key)
            assert _same(actual, _value(value)), f"{row.name}: --{key} {value} parsed as {actual!r}"


DEFAULTED = [r for r in KEYED if len(r.cells) == 4 and _literal(r.cells[3]) is not ...]


@pytest.mark.parametrize("row", [pytest.param(r, id=f"{r.line}") for r in DEFAULTED])
def test_the_default_a_row_states_is_the_clis(row: Row):
    stated = _literal(row.cells[3])
    if stated == "same":
        stated = _literal(row.cells[1])
    key = row.keys[0][0]
    if key == "model.optimizer.init_args.lr":  # "1e-6 when no optimizer is given": the stage's fallback AdamW
        actual = _fallback_lr()
    elif key.startswith("model.loss_kwargs."):  # a loss's own hyper-parameter: its declared default
        actual = _loss_hparam_default(key.rsplit(".", 1)[1])
    else:
        actual = resolve(defaults(row.stage), key)
    assert _same(actual, stated), f"{row.name}: {key} defaults to {actual!r}, the doc says {stated!r}"


def _loss_hparam_default(name: str) -> float:
    from dpo_lightning.losses import LOSS_HPARAMS

    defaults = {hparams[name].default for hparams in LOSS_HPARAMS.values() if name in hparams}
    assert len(defaults) == 1, f"loss_kwargs.{name}: declared with defaults {defaults}"
    return defaults.pop()


def _fallback_lr() -> float:
    from types import SimpleNamespace

    from dpo_lightning import DPOModule

    from tiny import tiny_config

    module = DPOModule(model_config=tiny_config())
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    return module.configure_optimizers()["optimizer"].defaults["lr"]


def test_the_doc_states_defaults_and_same_on_enough_rows():
    """Guard against a parser that finds no stated default (the test above would then check nothing)."""
    assert len(DEFAULTED) >= 20


# ------------------------------------------------------------------------------------------------ TRL's side


CONFIG_PREFIXES = ("SFTConfig.", "RewardConfig.", "DPOConfig.", "CPOConfig.")


def _trl_names(cell: str) -> list[str]:
    names = []
    for token in re.findall(r"`([^`]+)`", cell):
        token = token.split("=")[0].split(":")[0].strip()
        token = token.split(".", 1)[1] if token.startswith(CONFIG_PREFIXES) else token
        if re.fullmatch(r"[a-z][a-z0-9_]*", token):
            names.append(token)
    return names


def _config_row(row: Row) -> bool:
    """A row whose TRL side is config options (not a trainer, a metric, a column or a loss name)."""
    first = row.cells[0]
    if row.stage != "dpo":
        return first.startswith(("`SFTConfig.", "`RewardConfig.", "`dataset_text_field`"))
    return bool(_trl_names(first)) and "(trainer arg)" not in first and "Trainer`" not in first


@pytest.mark.trl
@pytest.mark.parametrize("row", [pytest.param(r, id=f"{r.line}") for r in ROWS if _config_row(r)])
def test_trls_side_of_each_row_is_trl_1_16s(row: Row):
    trl = pytest.importorskip("trl")
    config_cls = {"dpo": trl.DPOConfig, "sft": trl.SFTConfig, "rm": trl.RewardConfig}[row.stage]
    if row.cells[0].startswith("`CPOConfig."):
        config_cls = _cpo_config()
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    names = _trl_names(row.cells[0])
    default_cell = row.cells[1] if len(row.cells) == 4 else ""
    if "removed in 1.x" in default_cell:
        assert not set(names) & set(fields), f"{row.name}: the row says removed, TRL 1.16 has {names}"
        return
    names = [n for n in names if not (n == "warmup_ratio" and "before transformers 5" in row.cells[0])]
    missing = [n for n in names if n not in fields]
    assert not missing, f"{row.name}: not fields of {config_cls.__name__}: {missing}"
    stated = [c.strip() for c in default_cell.split(",")] if default_cell else []
    if len(stated) != len(names):
        return
    for name, cell in zip(names, stated):
        literal = _literal(cell)
        if literal is ...:
            continue
        field = fields[name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if name == "bf16" and default is None:
            default = True  # TRL's BaseConfig: bf16 = not fp16
        if name == "output_dir" and default is None:
            default = "trainer_output"  # transformers' __post_init__
        assert _same(default, literal), f"{row.name}: TRL's {name} defaults to {default!r}, the doc says {cell!r}"


def _cpo_config() -> type:
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.cpo import CPOConfig

    return CPOConfig


@pytest.mark.trl
def test_every_option_of_trls_dpoconfig_and_cpos_own_have_a_row():
    """The doc's claim: every DPOConfig option a TRL 1.16 user sets (those TRL adds to transformers'
    TrainingArguments; the common ones have rows of their own above), and CPOConfig's loss options."""
    trl = pytest.importorskip("trl")
    from transformers import TrainingArguments

    common = {f.name for f in dataclasses.fields(TrainingArguments)}
    named = {n for row in ROWS if row.stage == "dpo" for n in _trl_names(row.cells[0])}
    dpo = {f.name for f in dataclasses.fields(trl.DPOConfig)} - common
    cpo = {"cpo_alpha", "simpo_gamma", "alpha"}
    assert cpo <= {f.name for f in dataclasses.fields(_cpo_config())}
    missing = sorted((dpo | cpo) - named)
    assert not missing, f"TRL 1.16 options with no row in {DOC.name}: {missing}"


# ------------------------------------------------------------------------------------------------ the CLI's hints


def test_every_trl_name_of_a_keyed_row_has_a_hint_and_the_hint_is_the_rows():
    """config_errors.TRL_OPTIONS: for each TRL name, the option it points to is a key of that name's row; and
    every TRL name of a row that names a key here has an entry."""
    by_name: dict[str, list[Row]] = {}
    for row in ROWS:
        for name in _trl_names(row.cells[0]):
            by_name.setdefault(name, []).append(row)
    for name, hint in TRL_OPTIONS.items():
        assert name in by_name, f"TRL_OPTIONS[{name!r}]: no row of the option map names {name}"
        option = re.match(r"--([\w.]+)", hint).group(1)
        keys = {k for row in by_name[name] for k, _ in row.keys}
        assert any(option == k or option.startswith(k + ".") or k.startswith(option) for k in keys), (
            f"TRL_OPTIONS[{name!r}] = {hint!r}, but its row names {sorted(keys)}")
    options = [r for r in KEYED if _config_row(r) or "(trainer arg)" in r.cells[0]]  # not trainers, metrics, columns
    unmapped = sorted({n for row in options for n in _trl_names(row.cells[0])
                       if n not in TRL_OPTIONS and not _refusal(row)})
    assert not unmapped, f"rows name these TRL options, TRL_OPTIONS does not: {unmapped}"


def _refusal(row: Row) -> str | None:
    """What a row's dpo_lightning column opens with when it maps to no option: "not supported", "not needed"..."""
    m = re.match(r"not (supported|needed|automatic)\b", row.cells[2 if len(row.cells) == 4 else 1])
    return m.group(0) if m else None


# (a row that is "not needed" because an option here does it, `eval_packing`: `data.packing`, maps to that option)
REFUSED_ROWS = [r for r in ROWS if (_refusal(r) == "not supported" or _refusal(r) and not r.keys)
                and (_config_row(r) or r.cells[0].startswith("`CPOConfig."))]


def test_every_not_supported_row_is_read():
    names = {n for row in REFUSED_ROWS if _refusal(row) == "not supported" for n in _trl_names(row.cells[0])}
    assert {"use_weighting", "ld_alpha", "f_divergence_type", "alpha"} <= names


def _cli_refusal(option: str) -> list[str]:
    """The lines the CLI prints for ``--<option> 1`` (parse-only; it must be refused, exit status 2)."""
    from test_docs import _parse_only_cli

    from dpo_lightning.cli import cli_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as e:
        cli_main(["fit", *STAGES["dpo"], *BASE, f"--{option}", "1"], cli_class=_parse_only_cli())
    assert e.value.code == 2, err.getvalue()[-2000:]
    return err.getvalue().strip().splitlines()


@pytest.mark.parametrize("row", [pytest.param(r, id=f"{r.line}") for r in REFUSED_ROWS])
def test_a_row_without_an_option_here_has_a_refusal_hint_that_says_why(row: Row):
    """A TRL user who sets it anyway (`--model.use_weighting true`) reads the row's reason, not a fuzzy match to
    another option; every option the hint offers instead is one the row names."""
    keys = {k for k, _ in row.keys}
    for name in _trl_names(row.cells[0]):
        assert name not in TRL_OPTIONS, f"{row.name}: the row says {_refusal(row)}, TRL_OPTIONS maps {name}"
        assert name in TRL_REFUSED, f"{row.name}: TRL_REFUSED has no hint for {name}"
        error, hint = _cli_refusal(f"model.{name}")
        assert error == f"dpo_lightning: error: --model.{name}: not an option of DPOModule"
        assert hint.strip().startswith(f"TRL's {name} ") and f" {_refusal(row)}" in hint, hint
        offered = re.findall(r"--([\w.]+)", hint)
        assert all(o in keys for o in offered), f"{row.name}: the hint offers {offered}, the row names {keys}"


def test_every_refusal_hint_has_its_row():
    rows = {n: r for r in REFUSED_ROWS for n in _trl_names(r.cells[0])}
    assert set(TRL_REFUSED) <= set(rows), sorted(set(TRL_REFUSED) - set(rows))


def test_a_trl_name_is_matched_exactly_not_taken_for_another():
    """`--model.ld_alpha` was answered with TRL's rpo_alpha, `--model.use_weighting` with loss_weights: every
    TRL name the hints know gets its own hint; a misspelling still gets the option meant."""
    from dpo_lightning.cli.config_errors import _class_options, _fix

    _, valid = _class_options("dpo_lightning.DPOModule")
    assert "beta" in valid and "loss_weights" in valid
    for name in {*TRL_OPTIONS, *TRL_REFUSED} - set(valid):
        hint = _fix(f"model.{name}", valid, prefix="model")
        assert hint is not None and hint.startswith(f"TRL's {name} "), (name, hint)
    assert _fix("model.betta", valid, prefix="model") == "did you mean --model.beta?"
    assert _fix("model.use_weightin", valid, prefix="model").startswith("TRL's use_weighting (WPO) is not supported")


def test_the_spellings_the_hints_give_for_cpo_and_reference_free_are_trls_losses():
    """cpo_alpha, simpo_gamma, discopop_tau and reference_free map to loss settings: each is accepted, and
    TRL 0.x's reference_free sigmoid is our cpo with cpo_alpha 0 (the sigmoid loss on the policy's log-probs)."""
    import torch

    from dpo_lightning.losses import PairLogps, check_loss_config, compute_loss
    from dpo_lightning.stages.dpo import effective_reference

    check_loss_config(["simpo", "sft"], loss_weights=[1.0, 0.5])
    check_loss_config("simpo", loss_kwargs={"simpo_gamma": 0.7})
    check_loss_config("discopop", loss_kwargs={"discopop_tau": 0.1})
    free = check_loss_config("cpo", loss_kwargs={"cpo_alpha": 0.0}, beta=0.3, label_smoothing=0.1)
    assert effective_reference("copy", None, "cpo") == "none"  # no reference model is built
    chosen, rejected = torch.tensor([-12.0, -30.5, -3.0]), torch.tensor([-14.0, -29.0, -9.0])
    tokens = torch.tensor([6.0, 15.0, 2.0])
    with_ref = PairLogps(chosen, rejected, torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-4.0, 5.0, -6.0]),
                         tokens, tokens)
    without_ref = with_ref._replace(ref_chosen=None, ref_rejected=None)
    ours = compute_loss(free, with_ref)
    sigmoid = compute_loss("sigmoid", without_ref, beta=0.3, label_smoothing=0.1)
    torch.testing.assert_close(ours.losses, sigmoid.losses)
    torch.testing.assert_close(ours.chosen_rewards, sigmoid.chosen_rewards)
