"""Tests for the loss configuration: ``LOSS_HPARAMS``, ``BATCH_STATISTICS``, ``check_loss_config``, ``LossConfig``.

1. the declaration agrees with the loss functions' signatures, with their own checks and with docs/losses.md;
2. every configuration mistake raises ValueError before any model exists, naming the offending value and the
   valid choices;
3. valid configurations pass, and ``compute_loss`` with the resulting ``LossConfig`` gives the numbers of the
   loss functions called directly (non-default beta, label_smoothing and hyper-parameters).
"""

import inspect
import math
import pickle
import re
from pathlib import Path
from typing import Annotated

import pytest
import torch

from dpo_lightning.losses import (
    BATCH_STATISTICS,
    LOSS_HPARAMS,
    LOSSES,
    UNPAIRED_LOSSES,
    HParam,
    LossConfig,
    PairLogps,
    Range,
    bco_pair,
    check_loss_config,
    compute_loss,
    cpo,
    declared_hparams,
    discopop,
    hparam_names,
    robust,
    sft,
    sigmoid,
    simpo,
    statistic_names,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "losses.md"


def random_logps(batch: int = 6, seed: int = 0) -> PairLogps:
    g = torch.Generator().manual_seed(seed)
    lc = torch.randint(1, 20, (batch,), generator=g)
    lr = torch.randint(1, 20, (batch,), generator=g)
    ref_c = -lc * (0.5 + torch.rand(batch, generator=g, dtype=torch.float64))
    ref_r = -lr * (0.5 + torch.rand(batch, generator=g, dtype=torch.float64))
    c = ref_c + torch.randn(batch, generator=g, dtype=torch.float64)
    r = ref_r + torch.randn(batch, generator=g, dtype=torch.float64)
    return PairLogps(c, r, ref_c, ref_r, lc, lr)


def declared() -> list[tuple[str, str]]:
    return [(loss, key) for loss, specs in LOSS_HPARAMS.items() for key in specs]


def message(excinfo: pytest.ExceptionInfo) -> str:
    return str(excinfo.value)


# ---------------------------------------------------------------------------------------------------------
# 1. one declaration, agreeing with the signatures, the functions' own checks and the docs


def test_every_loss_is_declared():
    assert set(LOSS_HPARAMS) == set(LOSSES)
    assert not UNPAIRED_LOSSES & set(LOSSES)


# The table as it was written by hand before the signatures became the one declaration (#28): the table
# derived from them must say exactly this (defaults, intervals, notes), so config validation, the functions'
# own checks and TRL parity are unchanged. A new hyper-parameter is added here as well as on its signature.
_CDPO = HParam(0.0, 0.0, 0.5)
HAND_WRITTEN_LOSS_HPARAMS = {
    "sigmoid": {"label_smoothing": _CDPO},
    "hinge": {},
    "ipo": {},
    "robust": {"label_smoothing": HParam(0.0, 0.0, 0.5, high_open=True)},
    "exo_pair": {
        "label_smoothing": HParam(
            0.0, 0.0, 1.0, low_open=True, high_open=True, note="required; the EXO paper recommends 1e-3"
        )
    },
    "nca_pair": {},
    "bco_pair": {},
    "sppo_hard": {},
    "apo_zero": {},
    "apo_down": {},
    "aot": {"label_smoothing": _CDPO},
    "aot_unpaired": {"label_smoothing": _CDPO},
    "discopop": {"discopop_tau": HParam(0.05, 0.0, math.inf, low_open=True)},
    "sigmoid_norm": {},
    "sft": {},
    "kto_pair": {},
    "simpo": {"simpo_gamma": HParam(0.5, 0.0), "label_smoothing": _CDPO},
    "cpo": {"label_smoothing": _CDPO, "cpo_alpha": HParam(1.0, 0.0)},
    "orpo": {},
    "npo": {},
}


def test_table_derived_from_signatures_equals_the_hand_written_one():
    assert LOSS_HPARAMS == HAND_WRITTEN_LOSS_HPARAMS
    for name, specs in LOSS_HPARAMS.items():
        assert list(specs) == list(HAND_WRITTEN_LOSS_HPARAMS[name]), name  # signature order = the old order
        assert all(type(spec) is HParam for spec in specs.values()), name


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_name_is_function_name(name):
    """The functions' own checks name the loss by ``__name__``: it must be the name ``LOSSES`` selects it by."""
    assert LOSSES[name].__name__ == name


def test_declaration_is_read_from_the_annotation():
    """A keyword-only argument annotated with a Range is a hyper-parameter with that default and interval;
    one without is not; a Range on an argument that is not keyword-only with a default is refused."""

    def toy(
        logps, *, beta: float, tau: Annotated[float, Range(1.0, 2.0, high_open=True, note="n")] = 1.5, stat=None
    ):
        raise AssertionError("not called")

    def positional(logps, tau: Annotated[float, Range(0.0)] = 1.0, *, beta: float):
        raise AssertionError("not called")

    def no_default(logps, *, beta: float, tau: Annotated[float, Range(0.0)]):
        raise AssertionError("not called")

    assert declared_hparams(toy) == {"tau": HParam(1.5, 1.0, 2.0, high_open=True, note="n")}
    for fn in (positional, no_default):
        with pytest.raises(TypeError, match="tau"):
            declared_hparams(fn)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_signature_agrees_with_declaration(name):
    """Keyword-only arguments = beta + declared hyper-parameters (same defaults) + batch statistics (None)."""
    fn = LOSSES[name]
    params = inspect.signature(fn).parameters
    keyword_only = {p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
    stats = statistic_names(fn)
    assert keyword_only == {"beta"} | set(LOSS_HPARAMS[name]) | stats
    assert hparam_names(fn) == set(LOSS_HPARAMS[name])
    assert params["beta"].default is inspect.Parameter.empty  # beta is always given
    for key, spec in LOSS_HPARAMS[name].items():
        assert params[key].default == spec.default, (name, key)
    for key in stats:
        assert params[key].default is None, (name, key)


def test_batch_statistics_are_accepted_and_not_hyper_parameters():
    accepted = set().union(*(statistic_names(fn) for fn in LOSSES.values()))
    assert accepted == set(BATCH_STATISTICS)
    assert not {key for _, key in declared()} & set(BATCH_STATISTICS)


@pytest.mark.parametrize(("loss", "key"), declared())
def test_default_is_valid_unless_required(loss, key):
    spec = LOSS_HPARAMS[loss][key]
    if "required" in spec.note:
        with pytest.raises(ValueError):
            spec.check(loss, key, spec.default)
    else:
        assert spec.check(loss, key, spec.default) == spec.default


def _outside(loss: str, key: str) -> list[float]:
    """Values just outside the declared interval (and the non-finite ones)."""
    spec = LOSS_HPARAMS[loss][key]
    values = [math.nan, math.inf, -math.inf]
    if math.isfinite(spec.low):
        values += [spec.low - 0.01] + ([spec.low] if spec.low_open else [])
    if math.isfinite(spec.high):
        values += [spec.high + 0.01] + ([spec.high] if spec.high_open else [])
    return values


@pytest.mark.parametrize(("loss", "key"), declared())
def test_function_and_config_refuse_the_same_values(loss, key):
    """The functions check their own arguments against the same declaration, with the same message."""
    for bad in _outside(loss, key):
        with pytest.raises(ValueError) as direct:
            LOSSES[loss](random_logps(), beta=0.1, **{key: bad})
        kwargs = {"label_smoothing": bad} if key == "label_smoothing" else {"loss_kwargs": {key: bad}}
        with pytest.raises(ValueError) as config:
            check_loss_config(loss, **kwargs)
        assert message(direct) == message(config)
        assert loss in message(config) and key in message(config)
        assert LOSS_HPARAMS[loss][key].interval() in message(config)


def _docs_section(title: str) -> str:
    text = DOCS.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_docs_table_matches_declaration():
    """docs/losses.md "Hyper-parameters": one row per declared (loss, key), with its default and interval."""
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| ([^|]+?) \| ([^|]+?) \|", _docs_section("Hyper-parameters"), re.M)
    assert sorted((loss, key) for loss, key, _, _ in rows) == sorted(declared())
    for loss, key, default, interval in rows:
        spec = LOSS_HPARAMS[loss][key]
        assert float(default) == spec.default, (loss, key)
        assert interval.strip("`") == spec.interval(), (loss, key)


def test_docs_list_every_batch_statistic():
    section = _docs_section("Batch statistics and multi-device training")
    for key in BATCH_STATISTICS:
        assert f"`{key}`" in section, key


# ---------------------------------------------------------------------------------------------------------
# 2. configuration mistakes


def test_unknown_loss_name_lists_valid_names():
    with pytest.raises(ValueError) as excinfo:
        check_loss_config(["sigmoid", "dpo"])
    assert "'dpo'" in message(excinfo)
    for name in [*LOSSES, *UNPAIRED_LOSSES]:
        assert name in message(excinfo)


def test_renamed_loss_gets_the_trl_hint():
    hint = r"Unknown loss_type 'aot_pair' \(TRL 1.x renamed 'aot_pair' to 'aot_unpaired'\)"
    with pytest.raises(ValueError, match=hint):
        check_loss_config("aot_pair")


@pytest.mark.parametrize("loss_type", [[], ()])
def test_empty_loss_list(loss_type):
    with pytest.raises(ValueError, match="at least one loss"):
        check_loss_config(loss_type)


@pytest.mark.parametrize("loss_type", [None, 3])
def test_loss_type_not_a_name(loss_type):
    with pytest.raises(ValueError, match="loss_type must be a loss name or a list of names"):
        check_loss_config(loss_type)


def test_loss_weights_length_mismatch():
    with pytest.raises(ValueError, match=r"loss_weights has 1 entries but loss_type has 2: \['sigmoid', 'sft'\]"):
        check_loss_config(["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="loss_weights has 3 entries but loss_type has 1"):
        check_loss_config("sigmoid", loss_weights=[1.0, 1.0, 1.0])


@pytest.mark.parametrize("bad", [math.nan, math.inf, "1.0", None])
def test_loss_weights_not_finite(bad):
    with pytest.raises(ValueError, match="loss_weights must be finite numbers"):
        check_loss_config(["sigmoid", "sft"], loss_weights=[1.0, bad])


@pytest.mark.parametrize("beta", [0.0, -0.1, math.nan, math.inf, -math.inf, True, "0.1", None])
def test_bad_beta(beta):
    with pytest.raises(ValueError) as excinfo:
        check_loss_config("sigmoid", beta=beta)
    assert message(excinfo) == f"beta must be a finite number > 0, got {beta!r}"


def test_unknown_hyper_parameter_lists_the_valid_ones():
    with pytest.raises(ValueError) as excinfo:
        check_loss_config("discopop", loss_kwargs={"discopop_taus": 0.05})
    text = message(excinfo)
    assert "'discopop_taus'" in text
    assert "Did you mean 'discopop_tau'?" in text
    assert "loss_kwargs of loss_type ['discopop']: discopop_tau" in text
    # the selected losses may take none; every loss's keys are listed as well
    with pytest.raises(ValueError) as excinfo:
        check_loss_config(["sigmoid", "sft"], loss_kwargs={"temperature": 1.0})
    text = message(excinfo)
    assert "'temperature'" in text and "['sigmoid', 'sft']: none" in text
    assert "cpo_alpha, discopop_tau, simpo_gamma" in text


def test_compute_loss_reports_unknown_hyper_parameter_the_same_way():
    with pytest.raises(ValueError) as via_config:
        check_loss_config("robust", loss_kwargs={"label_smothing": 0.1})
    with pytest.raises(ValueError) as via_compute:
        compute_loss("robust", random_logps(), beta=0.1, label_smothing=0.1)
    assert message(via_compute) == message(via_config)


def test_hyper_parameter_of_another_loss():
    with pytest.raises(ValueError) as excinfo:
        check_loss_config("sigmoid", loss_kwargs={"discopop_tau": 0.05})
    assert message(excinfo) == "`discopop_tau`=0.05 is not used by loss_type ['sigmoid']; it is used by: discopop"
    with pytest.raises(ValueError, match=r"`cpo_alpha`=0.5 is not used by loss_type \['simpo', 'sft'\]; .*: cpo$"):
        check_loss_config(["simpo", "sft"], loss_kwargs={"cpo_alpha": 0.5})
    # given at its default value it is still set, and still unused
    with pytest.raises(ValueError, match="simpo_gamma"):
        check_loss_config("cpo", loss_kwargs={"simpo_gamma": 0.5})


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", ["sft"], ["ipo", "discopop"], "kto"])
def test_label_smoothing_with_losses_that_ignore_it(loss_type):
    names = [loss_type] if isinstance(loss_type, str) else loss_type
    with pytest.raises(ValueError) as excinfo:
        check_loss_config(loss_type, label_smoothing=0.1)
    users = sorted(loss for loss, specs in LOSS_HPARAMS.items() if "label_smoothing" in specs)
    assert message(excinfo) == (
        f"`label_smoothing`=0.1 is not used by loss_type {names}; it is used by: {', '.join(users)}"
    )
    check_loss_config(loss_type, label_smoothing=0.0)  # the default counts as not set


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "match"),
    [
        ("sigmoid", {"label_smoothing": 0.6}, r"loss 'sigmoid' needs label_smoothing in \[0.0, 0.5\], got 0.6"),
        ("robust", {"label_smoothing": 0.5}, r"loss 'robust' needs label_smoothing in \[0.0, 0.5\), got 0.5"),
        (["sigmoid", "robust"], {"label_smoothing": 0.5}, r"loss 'robust' needs label_smoothing in \[0.0, 0.5\)"),
        ("aot", {"label_smoothing": -0.1}, r"loss 'aot' needs label_smoothing in \[0.0, 0.5\], got -0.1"),
        ("exo_pair", {}, r"loss 'exo_pair' needs label_smoothing in \(0.0, 1.0\) \(required; .*1e-3\), got 0.0"),
        ("exo_pair", {"label_smoothing": 1.0}, r"exo_pair.*\(0.0, 1.0\).*got 1.0"),
        ("discopop", {"loss_kwargs": {"discopop_tau": 0.0}}, r"'discopop' needs discopop_tau in \(0.0, inf\)"),
        ("cpo", {"loss_kwargs": {"cpo_alpha": -1.0}}, r"'cpo' needs cpo_alpha in \[0.0, inf\), got -1.0"),
        ("simpo", {"loss_kwargs": {"simpo_gamma": -0.5}}, r"'simpo' needs simpo_gamma in \[0.0, inf\)"),
        ("simpo", {"loss_kwargs": {"simpo_gamma": "0.5"}}, r"'simpo' needs simpo_gamma to be a number"),
        ("simpo", {"loss_kwargs": {"simpo_gamma": True}}, r"'simpo' needs simpo_gamma to be a number"),
    ],
)
def test_out_of_range(loss_type, kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_loss_config(loss_type, **kwargs)


@pytest.mark.parametrize("key", sorted(BATCH_STATISTICS))
def test_batch_statistics_cannot_be_configured(key):
    with pytest.raises(ValueError) as excinfo:
        check_loss_config("sigmoid", loss_kwargs={key: 0.0})
    text = message(excinfo)
    assert f"`{key}`" in text and BATCH_STATISTICS[key] in text
    assert "computed per batch" in text and "not configured" in text


@pytest.mark.parametrize("key", ["beta", "label_smoothing"])
def test_own_arguments_are_not_loss_kwargs(key):
    with pytest.raises(ValueError, match=f"`{key}` is an argument of its own"):
        check_loss_config("robust", loss_kwargs={key: 0.1})


def test_kto_is_valid_only_on_its_own():
    config = check_loss_config("kto", beta=0.2)
    assert config == LossConfig(("kto",), (1.0,), 0.2, ({},))
    with pytest.raises(ValueError, match=r"'kto' \(unpaired data\) must be used on its own, got \['sigmoid', 'kto'\]"):
        check_loss_config(["sigmoid", "kto"])
    with pytest.raises(ValueError, match=r"loss_weights=\[1.0\] is not used by loss_type \['kto'\]"):
        check_loss_config("kto", loss_weights=[1.0])
    with pytest.raises(ValueError, match=r"`discopop_tau`=0.1 is not used by loss_type \['kto'\]"):
        check_loss_config("kto", loss_kwargs={"discopop_tau": 0.1})
    with pytest.raises(ValueError, match="use kto_loss"):
        compute_loss(config, random_logps())


# ---------------------------------------------------------------------------------------------------------
# 3. valid configurations, and compute_loss with them


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "expected"),
    [
        ("sigmoid", {}, LossConfig(("sigmoid",), (1.0,), 0.1, ({"label_smoothing": 0.0},))),
        ("hinge", {"beta": 0.5}, LossConfig(("hinge",), (1.0,), 0.5, ({},))),
        (  # RPO
            ["sigmoid", "sft"],
            {"loss_weights": [1.0, 1.0]},
            LossConfig(("sigmoid", "sft"), (1.0, 1.0), 0.1, ({"label_smoothing": 0.0}, {})),
        ),
        (
            "discopop",
            {"loss_kwargs": {"discopop_tau": 0.1}},
            LossConfig(("discopop",), (1.0,), 0.1, ({"discopop_tau": 0.1},)),
        ),
        ("robust", {"label_smoothing": 0.1}, LossConfig(("robust",), (1.0,), 0.1, ({"label_smoothing": 0.1},))),
        ("exo_pair", {"label_smoothing": 1e-3}, LossConfig(("exo_pair",), (1.0,), 0.1, ({"label_smoothing": 1e-3},))),
        (
            "simpo",
            {"beta": 2.0, "loss_kwargs": {"simpo_gamma": 0.8}},
            LossConfig(("simpo",), (1.0,), 2.0, ({"simpo_gamma": 0.8, "label_smoothing": 0.0},)),
        ),
        (
            ("cpo",),
            {"label_smoothing": 0.1, "loss_kwargs": {"cpo_alpha": 0},
             "loss_weights": (2,)},  # fmt: skip
            LossConfig(("cpo",), (2.0,), 0.1, ({"label_smoothing": 0.1, "cpo_alpha": 0.0},)),
        ),
        (  # label_smoothing goes to the losses that use it only
            ["ipo", "sigmoid"],
            {"label_smoothing": 0.2, "loss_weights": [0.5, 0.5]},
            LossConfig(("ipo", "sigmoid"), (0.5, 0.5), 0.1, ({}, {"label_smoothing": 0.2})),
        ),
    ],
)
def test_valid_configs(loss_type, kwargs, expected):
    config = check_loss_config(loss_type, **kwargs)
    assert config == expected
    assert pickle.loads(pickle.dumps(config)) == config  # a module holding it can be pickled (ddp_spawn)


@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"exo_pair"}))
def test_every_loss_alone_with_defaults_is_valid(name):
    config = check_loss_config(name)
    assert config.hparams == ({key: spec.default for key, spec in LOSS_HPARAMS[name].items()},)


def test_module_style_values():
    """What DPOModule holds: a list from YAML, a weight list, and loss_kwargs as a dict (or None)."""
    config = check_loss_config(
        ["robust", "discopop"], loss_weights=[1.0, 0.5], beta=0.3, label_smoothing=0.1,
        loss_kwargs={"discopop_tau": 0.07},
    )  # fmt: skip
    assert config.hparams == ({"label_smoothing": 0.1}, {"discopop_tau": 0.07})
    assert check_loss_config("sigmoid", loss_weights=None, beta=0.1, label_smoothing=0.0, loss_kwargs=None)


def test_compute_loss_with_config_equals_direct_calls():
    """beta 0.37, eps 0.15, tau 0.2, weights [0.6, 1.3, 0.2]: the weighted sum of the functions called directly;
    rewards are the first loss's."""
    logps = random_logps(seed=3)
    config = check_loss_config(
        ["robust", "discopop", "sft"], loss_weights=[0.6, 1.3, 0.2], beta=0.37, label_smoothing=0.15,
        loss_kwargs={"discopop_tau": 0.2},
    )  # fmt: skip
    out = compute_loss(config, logps)
    first = robust(logps, beta=0.37, label_smoothing=0.15)
    second = discopop(logps, beta=0.37, discopop_tau=0.2)
    expected = 0.6 * first.losses + 1.3 * second.losses + 0.2 * sft(logps, beta=0.37).losses
    torch.testing.assert_close(out.losses, expected)
    torch.testing.assert_close(out.chosen_rewards, first.chosen_rewards)
    torch.testing.assert_close(out.rejected_rewards, first.rejected_rewards)
    # the by-name form builds the same config, so the same numbers
    by_name = compute_loss(
        ["robust", "discopop", "sft"], logps, beta=0.37, loss_weights=[0.6, 1.3, 0.2], label_smoothing=0.15,
        discopop_tau=0.2,
    )  # fmt: skip
    torch.testing.assert_close(by_name.losses, out.losses)


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "direct"),
    [
        ("sigmoid", {"label_smoothing": 0.3}, lambda x: sigmoid(x, beta=0.37, label_smoothing=0.3)),
        ("simpo", {"loss_kwargs": {"simpo_gamma": 1.1}}, lambda x: simpo(x, beta=0.37, simpo_gamma=1.1)),
        ("cpo", {"label_smoothing": 0.05, "loss_kwargs": {"cpo_alpha": 0.4}},
         lambda x: cpo(x, beta=0.37, label_smoothing=0.05, cpo_alpha=0.4)),  # fmt: skip
        ("discopop", {}, lambda x: discopop(x, beta=0.37)),  # the declared default tau, 0.05
    ],
)
def test_compute_loss_single_loss_equals_direct_call(loss_type, kwargs, direct):
    logps = random_logps(seed=4)
    out = compute_loss(check_loss_config(loss_type, beta=0.37, **kwargs), logps)
    expected = direct(logps)
    torch.testing.assert_close(out.losses, expected.losses)
    torch.testing.assert_close(out.chosen_rewards, expected.chosen_rewards)


def test_batch_statistics_go_with_the_config():
    logps = random_logps(seed=5)
    config = check_loss_config(["bco_pair", "sft"], loss_weights=[1.0, 0.5], beta=0.37)
    delta, tokens = torch.tensor(0.02, dtype=torch.float64), 40.0
    out = compute_loss(config, logps, bco_delta=delta, sft_num_tokens=tokens)
    expected = (
        bco_pair(logps, beta=0.37, bco_delta=delta).losses + 0.5 * sft(logps, beta=0.37, sft_num_tokens=tokens).losses
    )
    torch.testing.assert_close(out.losses, expected)
    # None means "not given": the loss computes the statistic from the batch
    torch.testing.assert_close(
        compute_loss(config, logps, bco_delta=None).losses,
        bco_pair(logps, beta=0.37).losses + 0.5 * sft(logps, beta=0.37).losses,
    )


def test_compute_loss_with_config_refuses_anything_but_statistics():
    logps = random_logps()
    config = check_loss_config("sigmoid")
    with pytest.raises(ValueError, match=r"`bco_delta` is not used by loss_type \['sigmoid'\]; .*: bco_pair$"):
        compute_loss(config, logps, bco_delta=0.1)
    with pytest.raises(ValueError, match=r"`sft_num_tokens` is not used .*: cpo, orpo, sft$"):
        compute_loss("sigmoid", logps, beta=0.1, sft_num_tokens=10.0)
    for kwargs in ({"beta": 0.2}, {"label_smoothing": 0.1}, {"loss_weights": [1.0]}, {"discopop_tau": 0.1}):
        with pytest.raises(ValueError, match=f"LossConfig and also \\['{next(iter(kwargs))}'\\]"):
            compute_loss(config, logps, **kwargs)
    with pytest.raises(TypeError, match="needs beta"):
        compute_loss("sigmoid", logps)
