"""Config mistakes in one or two lines: the option, the reason, then the fix.

jsonargparse reports a mistake after the whole usage (~70 lines) and inside its nested type checks, and an
error a class raises while it is built (an unknown loss, an unknown reference) comes wrapped in the same
nesting. The CLI prints instead::

    dpo_lightning: error: --model.learning_rate: not an option of DPOModule
      TRL's learning_rate is --model.optimizer.init_args.lr here (docs/migrating_from_trl.md)

The second line is the fix: the option meant (difflib over the valid names at that level: "did you
mean"), TRL's name mapped to ours (``TRL_OPTIONS``, the option map of ``docs/migrating_from_trl.md``; a test
keeps the two equal), why TRL's name has no option here (``TRL_REFUSED``: "not supported", with the nearest
option that is here where there is an honest one), or where the valid options are listed. A TRL name is
matched exactly before any fuzzy match, so it is never taken for another TRL name.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Iterable
from typing import Any, NoReturn

from jsonargparse import ArgumentParser

from dpo_lightning._moved import import_module

# TRL 1.16's option names (DPOConfig, SFTConfig, RewardConfig, CPOConfig, trainer arguments; TRL 0.x's
# reference_free) -> the option here, as the option map of docs/migrating_from_trl.md gives it
# (tests/test_migrating_doc.py checks every entry against its row). The value is what to type: an option, or
# an option and the value that does what TRL's does.
TRL_OPTIONS = {
    "beta": "--model.beta",
    "loss_type": "--model.loss_type",
    "loss_weights": "--model.loss_weights",
    "rpo_alpha": "--model.loss_type '[sigmoid, sft]' --model.loss_weights '[1.0, ALPHA]'",
    "label_smoothing": "--model.label_smoothing",
    "learning_rate": "--model.optimizer.init_args.lr",
    "optim": "--model.optimizer (a class_path, e.g. torch.optim.AdamW)",
    "weight_decay": "--model.optimizer.init_args.weight_decay",
    "adam_beta1": "--model.optimizer.init_args.betas '[BETA1, BETA2]'",
    "adam_beta2": "--model.optimizer.init_args.betas '[BETA1, BETA2]'",
    "adam_epsilon": "--model.optimizer.init_args.eps",
    "lr_scheduler_type": "--model.lr_decay (linear, cosine or constant) or --model.scheduler",
    "warmup_steps": "--model.warmup_ratio (a fraction of the run's optimizer steps)",
    "warmup_ratio": "--model.warmup_ratio",
    "per_device_train_batch_size": "--data.batch_size",
    "per_device_eval_batch_size": "--data.eval_batch_size",
    "gradient_accumulation_steps": "--trainer.accumulate_grad_batches",
    "num_train_epochs": "--trainer.max_epochs",
    "max_steps": "--trainer.max_steps",
    "max_grad_norm": "--trainer.gradient_clip_val",
    "max_length": "--data.max_length",
    "max_prompt_length": "--data.max_prompt_length",
    "truncation_mode": "--data.truncation_mode (which end of the prompt to keep)",
    "precompute_ref_log_probs": "--model.reference precomputed",
    "ref_model": "--model.ref_model",
    "sync_ref_model": "--model.reference '{class_path: dpo_lightning.CopyReference, init_args: {sync_steps: N}}'",
    "ref_model_mixup_alpha": "--model.reference.init_args.sync_alpha (model.reference: dpo_lightning.CopyReference)",
    "ref_model_sync_steps": "--model.reference.init_args.sync_steps (model.reference: dpo_lightning.CopyReference)",
    "peft_config": "--model.lora (r, alpha, dropout, target_modules)",
    "gradient_checkpointing": "--model.memory.activation_checkpointing",
    "bf16": "--trainer.precision bf16-mixed",
    "fp16": "--trainer.precision 16-mixed",
    "padding_free": "--data.collator",
    "use_logits_to_keep": "--model.memory.lean_logprobs",
    "logging_steps": "--trainer.log_every_n_steps",
    "eval_strategy": "--trainer.val_check_interval (in batches) and --trainer.check_val_every_n_epoch null",
    "eval_steps": "--trainer.val_check_interval (in batches: eval_steps x accumulate_grad_batches)",
    "save_strategy": "--checkpoint.save_every_n_steps",
    "save_steps": "--checkpoint.save_every_n_steps",
    "save_total_limit": "--checkpoint.save_top_k",
    "report_to": "--trainer.logger",
    "output_dir": "--trainer.logger.init_args.save_dir (and .name)",
    "resume_from_checkpoint": "--ckpt_path (a path, or last)",
    "seed": "--seed_everything",
    "dataset_num_proc": "--data.num_proc",
    "disable_dropout": "--model.disable_dropout",
    "completion_only_loss": "--data.completion_only_loss",
    "assistant_only_loss": "--data.completion_only_loss",
    "packing": "--data.packing",
    "packing_strategy": "--data.packing_strategy",
    "eval_packing": "--data.packing",
    "dataset_text_field": "--data.columns '{text: COLUMN}'",
    "center_rewards_coefficient": "--model.center_rewards_coefficient",
    "trust_remote_code": "--model.trust_remote_code",
    "model_init_kwargs": "--model.dtype and --model.attn_implementation (the from_pretrained arguments taken here)",
    "pad_to_multiple_of": "--data.pad_to_multiple_of",
    "precompute_ref_batch_size": "--data.eval_batch_size (the batch size of the precompute pass, on every split)",
    "discopop_tau": "--model.loss_kwargs.discopop_tau (with --model.loss_type discopop)",
    "reference_free": "--model.loss_type cpo --model.loss_kwargs.cpo_alpha 0 (DPO's sigmoid on the policy's "
                      "log-probs alone; the other losses need a reference)",
    # CPOConfig (TRL's CPOTrainer: its loss_type sigmoid is our cpo, its simpo ours)
    "cpo_alpha": "--model.loss_kwargs.cpo_alpha with --model.loss_type cpo (TRL's loss_type sigmoid), or "
                 "--model.loss_weights '[1.0, ALPHA]' with --model.loss_type '[simpo, sft]' (TRL's simpo)",
    "simpo_gamma": "--model.loss_kwargs.simpo_gamma (with --model.loss_type simpo)",
}

# TRL 1.16's options with no option here -> the rest of the sentence "TRL's <name> ...": why, and the nearest
# option that is here where there is an honest one (the "not supported" / "not needed" rows of
# docs/migrating_from_trl.md; tests/test_migrating_doc.py checks every entry against its row).
TRL_REFUSED = {
    "use_weighting": "(WPO) is not supported: weighting each pair by the policy's length-normalised probability is "
                     "not implemented (--model.loss_weights weights the losses of loss_type, not pairs)",
    "ld_alpha": "(LD-DPO) is not supported: down-weighting the tokens past the shorter response is not implemented; "
                "the length remedy here is --model.loss_type sigmoid_norm (the per-token margin)",
    "f_divergence_type": "(f-DPO) is not supported: the divergence to the reference is the reverse KL (TRL's "
                         "default, reverse_kl); the others are not implemented",
    "f_alpha_divergence_coef": "(f-DPO's alpha-divergence) is not supported: the divergence to the reference is "
                               "the reverse KL (TRL's default f_divergence_type, reverse_kl)",
    "router_aux_loss_coef": "(MoE load balancing) is not supported: no auxiliary loss is added to the preference "
                            "loss",
    "activation_offloading": "is not supported: activations stay on the device; "
                             "--model.memory.activation_checkpointing saves their memory instead",
    "alpha": "(CPOConfig, AlphaPO) is not supported: rewards are the policy's log-probs, TRL's alpha 0 (LoRA's "
             "alpha is --model.lora.alpha)",
    "pad_token": "(deprecated in TRL) is not needed: padding is masked out of every loss; the tokenizer's pad "
                 "token pads, or its eos token where it has none",
    "logging_first_step": "is not needed: every logged value covers the whole window since the last log",
    "load_best_model_at_end": "is not automatic: the end of fit lists the checkpoints and marks the best; "
                              "python -m dpo_lightning export <best .ckpt> OUT",
}

_DOC = "docs/migrating_from_trl.md"


def did_you_mean(word: str, options: Iterable[str]) -> str | None:
    """The closest of ``options`` to ``word`` (difflib), or None."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return close[0] if close else None


def _class_options(class_path: str) -> tuple[type | None, list[str]]:
    """A class and the options jsonargparse gives it (its ``__init__`` parameters, ``**kwargs`` followed)."""
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(import_module(module), name)
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, fail_untyped=False)
        names = [a.dest for a in parser._actions if a.dest != "help" and not a.dest.endswith(".help")]
        return cls, names
    except Exception:  # noqa: BLE001 - a hint is a courtesy: without it, the message says the rest
        return None, []


def _parser_options(parser: Any) -> list[str]:
    return [a.dest for a in getattr(parser, "_actions", []) if a.dest != "help" and not a.dest.endswith(".help")]


def _ratio(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def _trl_hint(name: str) -> str:
    """The line for TRL's option ``name``: the option here, or why there is none."""
    if name in TRL_OPTIONS:
        return f"TRL's {name} is {TRL_OPTIONS[name]} here ({_DOC})"
    return f"TRL's {name} {TRL_REFUSED[name]} ({_DOC})"


def _fix(option: str, valid: list[str], *, prefix: str = "", listing: str | None = None) -> str | None:
    """The second line for an unknown ``option`` (dotted, without ``--``): TRL's name for it, the valid option
    it is closest to, or a listing. A misspelt TRL name (``save_stepss``) counts as TRL's when it is closer
    to that than to any valid option."""
    leaf = option.rsplit(".", 1)[-1]
    rel = option[len(prefix) + 1:] if prefix and option.startswith(prefix + ".") else option
    # Inside a class's init_args (an optimizer's), only a TRL name that is an option here: not the names
    # without one (TRL's alpha is not AdamW's), and no misspelt TRL name.
    in_class = ".init_args." in f".{option}."
    if leaf not in valid and rel not in valid and (leaf in TRL_OPTIONS or (leaf in TRL_REFUSED and not in_class)):
        return _trl_hint(leaf)  # exact names first: a TRL name is never taken for another one
    close = did_you_mean(rel, valid) or (did_you_mean(leaf, valid) if rel != leaf else None)
    trl = None if in_class else did_you_mean(leaf, [*TRL_OPTIONS, *TRL_REFUSED])
    if trl and (close is None or _ratio(leaf, trl) > _ratio(rel, close)):
        return _trl_hint(trl)
    if close:
        return f"did you mean --{prefix + '.' if prefix else ''}{close}?"
    return listing


def _listing(cls: type | None, prefix: str, valid: list[str], command: str) -> str | None:
    if cls is None:
        return None
    group = prefix.split(".")[0]
    if prefix in ("model", "data"):
        return f"its options: {command} --{group}.help {cls.__name__}"
    return f"{cls.__name__} takes: {', '.join(valid)}" if valid else None


def _after(message: str, pattern: str) -> re.Match | None:
    found = None
    for found in re.finditer(pattern, message):
        pass
    return found


def explain(message: str, parser: Any = None, command: str = "python -m dpo_lightning fit") -> list[str]:
    """One or two lines for a jsonargparse error ``message`` (``parser``: the (sub)command's parser, for the
    valid top-level names; ``command``: how the user ran it, for where to read the options)."""
    top = _parser_options(parser)
    unknown = None
    m = re.match(r"unrecognized arguments: (.*)", message, flags=re.S)
    if m:
        words = m.group(1).split() or ["?"]
        unknown = next((w for w in words if w.startswith("-")), words[0]).lstrip("-").split("=", 1)[0]
    m = re.search(r"Subcommand '\w+' does not accept option '([\w.]+)'", message)
    unknown = m.group(1) if m else unknown
    m = re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'", message)
    unknown = f"{m.group(1)}.{m.group(2)}" if m else unknown
    if unknown is not None:
        listing = f"{command} --help lists every option"
        return [f"--{unknown}: no such option", *filter(None, [_fix(unknown, top, listing=listing)])]
    m = re.search(r"Option '([\w.]+)' is not accepted before subcommand", message)
    if m:
        return [f"--{m.group(1)}: give it after the subcommand, e.g. python -m dpo_lightning fit --{m.group(1)} ..."]

    keys = re.findall(r'Parser key "([\w.]+)"', message)
    outer = keys[0] if keys else ""
    nested = _after(message, r"NestedArg\(key='([\w.]+)'")
    m = re.search(r'Parser key "config":\s*(.*)', message)
    if m and outer == "config":
        return [f"--config: {m.group(1).strip()}"]

    m = _after(message, r"Option '(\w+)' is not accepted")
    if m:
        name = m.group(1)
        if nested:
            option = f"{outer}.{nested.group(1)}"
        else:
            option = ".".join([*keys, name]) if keys[-1:] != [name] else ".".join(keys)
        # The class that refused it: named on the same line (callables: "Got value: Namespace(class_path=...")
        # or on the line before ("Problem with given class_path '...'").
        line_end = message.find("\n", m.end())
        same_line = re.search(r"class_path='([\w.]+)'", message[m.end(): line_end if line_end >= 0 else None])
        before = _after(message[: m.start()], r"class_path '([\w.]+)'")
        class_path = same_line.group(1) if same_line else before.group(1) if before else None
        cls, valid = _class_options(class_path) if class_path else (None, [])
        prefix = option[: -len(name) - 1] if option.endswith("." + name) else outer
        owner = cls.__name__ if cls is not None else prefix or "this command"
        fix = _fix(option, valid, prefix=prefix, listing=_listing(cls, prefix, valid, command))
        return [f"--{option}: not an option of {owner}", *filter(None, [fix])]

    m = _after(message, r"Problem with given class_path '([\w.]+)':\s*\n?\s*(.+)")
    if m and ("has no attribute" in m.group(2) or "No module named" in m.group(2)):
        class_path = m.group(1)
        where = f"{outer}.class_path" if not nested else f"{outer}.{nested.group(1)}"
        module, _, name = class_path.rpartition(".")
        names = []
        try:
            names = [f"{module}.{n}" for n in dir(import_module(module)) if not n.startswith("_")]
        except Exception:  # noqa: BLE001
            pass
        close = did_you_mean(class_path, names)
        return [f"--{where}: no class {class_path}", *([f"did you mean {close}?"] if close else [])]

    m = _after(message, r"Expected a (.+?)\. Got value: (.*)")
    if m:
        option = _value_option(message, keys, outer, nested)
        # A value inside a class's init_args: jsonargparse appends the class's namespace (". Got value: Namespace(")
        expected, got = m.group(1), m.group(2).split(". Got value: ", 1)[0].strip()
        choices = re.match(r"typing\.Literal\[(.*)\]$", expected)
        if choices:
            values = [v.strip().strip("'\"") for v in choices.group(1).split(",")]
            close = did_you_mean(got, values)
            return [f"--{option}: {got!r} is not one of {', '.join(values)}",
                    *([f"did you mean --{option} {close}?"] if close else [])]
        kind = re.sub(r"<class '(\w+)'>", r"\1", expected)
        return [f"--{option}: expected {kind}, got {got!r}"]

    union = _union_value(message)
    if union is not None:
        option = _value_option(message, keys, outer, nested)
        return [f"--{option}: expected {union[0]}, got {union[1]!r}"]

    # Anything else: the innermost reason, without the union's bookkeeping.
    noise = ("Does not validate against", "Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>",
             "Parser key", "Problem with given class_path")
    lines = (line.strip(" -") for line in message.splitlines())
    reasons = [line for line in lines if line and not line.startswith(noise)]
    option = f"{outer}.{nested.group(1)}" if nested else ".".join(keys)
    reason = reasons[0] if reasons else message.strip().splitlines()[0]
    return [f"--{option}: {reason}" if option else reason]


def _value_option(message: str, keys: list[str], outer: str, nested: re.Match | None) -> str:
    """The option whose value is wrong: from the command line's nested key, or from the parser keys of a config
    file, where a key inside a class's init_args (an optimizer's ``lr``) is ``<group>.init_args.<key>``."""
    if nested:
        return f"{outer}.{nested.group(1)}"
    if len(keys) > 1 and re.search(rf'callable class: Parser key "{re.escape(keys[-1])}"', message):
        return ".".join([*keys[:-1], "init_args", keys[-1]])
    return ".".join(keys)


def _union_value(message: str) -> tuple[str, str] | None:
    """``("float or torch.Tensor", "abc")`` when the innermost option of ``message`` (after its last ``Parser key``)
    is a union of plain classes that the given value matched none of (an optimizer's ``lr: float | Tensor``
    given ``abc``); None otherwise."""
    last = _after(message, r'Parser key "[\w.]+":')
    tail = message[last.end():] if last else message
    subtypes = re.search(r"Subtypes: \[(.*?)\]\s*$", tail, flags=re.M)
    given = re.search(r"Given value: (.*?)(?:\. Got value: .*)?$", tail, flags=re.M)
    if subtypes is None or given is None:
        return None
    parts = [part.strip() for part in subtypes.group(1).split(",")]
    names = [re.fullmatch(r"<class '([\w.]+)'>", part) for part in parts]
    if not all(names):
        return None
    kinds = [n.group(1) for n in names if n.group(1) != "NoneType"]
    return (" or ".join(kinds), given.group(1).strip()) if kinds else None


_WRAPPERS = ("Does not validate against any of the Union subtypes", "Problem with given class_path")


def init_error(err: BaseException, config: Any = None) -> str | None:
    """One line for an error a class raised while the CLI built it (jsonargparse wraps it in its union
    report): ``model (DPOModule): <the class's message>``; None when it is not a ``ValueError`` of the
    class's own (a bug keeps its traceback)."""
    if not str(err).startswith(_WRAPPERS):
        return None
    given = re.search(r"class_path='([\w.]+)'", str(err))
    inner: BaseException = err
    while inner.__cause__ is not None and str(inner).startswith(_WRAPPERS):
        inner = inner.__cause__
    if str(inner).startswith(_WRAPPERS) or not isinstance(inner, ValueError | OSError):
        return None
    where = ""
    if given:
        class_path = given.group(1)
        group = None
        for key in ("model", "data"):
            node = config.get(key) if config is not None else None
            if node is not None and getattr(node, "class_path", None) == class_path:
                group = key
        name = class_path.rsplit(".", 1)[-1]
        where = f"{group} ({name}): " if group else f"{name}: "
    return where + " ".join(str(inner).split("\n"))


class ShortErrors:
    """A jsonargparse parser whose errors are one or two lines (``config_errors.explain``: the option, the
    reason, the fix) instead of the usage and the nested type report; ``JSONARGPARSE_DEBUG`` and
    ``exit_on_error=False`` keep jsonargparse's own behaviour."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG", "").lower() in ("1", "true", "yes", "on"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        command = parser.prog.replace(" [options]", "")
        if command.endswith(" generate predict"):  # `generate` runs LightningCLI's `predict` inside
            command = command.removesuffix(" predict")
        try:
            lines = explain(message, parser, command)
        except Exception:  # noqa: BLE001 - never worse than jsonargparse's own report
            super().error(message, ex)
        sys.stderr.write("dpo_lightning: error: " + "\n  ".join(lines) + "\n")
        self.exit(2)
