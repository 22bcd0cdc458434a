"""The reward-model judge: a sequence classifier (a reward model) scores each prompt + response.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from dpo_lightning.data.errors import DataError, RowRef
from dpo_lightning.data.formats import Text, UnpairedExample
from dpo_lightning.data.render import render_unpaired
from dpo_lightning.data.tokenize import TokenizeConfig, tokenize_completions
from dpo_lightning.data.tokenizer import load_tokenizer
from dpo_lightning.generation.judges.base import (
    Failure,
    Judge,
    as_completion,
    check_batching,
    forward_batches,
    length_limit,
    padded_inputs,
)
from dpo_lightning.models.loading import check_vocab, load_model

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------- reward models

# The judge measures a response's tokens itself (`max_length`, the model's positions), so nothing is cut.
_WHOLE = TokenizeConfig(max_length=sys.maxsize, max_prompt_length=None)


class RewardModelJudge(Judge):
    """Scores each row with a reward model: an ``AutoModelForSequenceClassification`` with one label, such
    as a `RewardModule` export (``runs/tiny_rm/version_0/hf_export``).

    A row is tokenized exactly as `PreferenceDataModule` tokenizes one side of a pair (the same
    `render_unpaired` / `tokenize_completions`: BOS, EOS after a string response, the chat template
    for message lists), without truncation, and right-padded with the tokenizer's pad id; the score is
    ``logits[:, 0]`` at the last token, as `RewardModule` reads it in training. Rows are batched by
    length (``batch_size`` per forward, no gradients, eval mode). A row longer than ``max_length`` or the
    model's positions, or with no response tokens, is None (counted in ``stats``).
    """

    def __init__(
        self,
        model: str | PreTrainedModel,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        batch_size: int = 16,
        device: str | None = None,
        max_length: int | None = None,
        dtype: str | None = None,
    ) -> None:
        """
        Args:
            model: Path or hub id of the reward model, or a loaded model.
            tokenizer: The tokenizer it was trained with (path, hub id, ``synthetic:<name>`` or object);
                None: the one saved with ``model`` (a path or hub id).
            batch_size: Rows per forward.
            device: Where the model runs; None: a loaded model stays where it is, a path loads on CUDA when
                available, else the CPU.
            max_length: Longest prompt + response in tokens; longer rows get no score. None: the model's
                positions.
            dtype: The dtype to load ``model`` in (``float32``, ``bfloat16``, ``float16``); None: float32.
        """
        super().__init__()
        check_batching(batch_size, max_length)
        if isinstance(model, str):
            self._spec = f"reward_model:{model}"
            tokenizer = model if tokenizer is None else tokenizer
            self.model = load_model(model, auto_class=AutoModelForSequenceClassification, dtype=dtype)
            self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        elif isinstance(model, torch.nn.Module):
            self._spec = f"reward_model:{getattr(model, 'name_or_path', '') or type(model).__name__}"
            if tokenizer is None:
                raise ValueError(f"{self._spec}: give the tokenizer the reward model was trained with")
            if dtype is not None:
                raise ValueError(f"{self._spec}: dtype applies when loading a model from a path; convert the model "
                                 "object yourself")
            self.model = model if device is None else model.to(device)
        else:
            raise ValueError(f"reward model: expected a path, hub id or model, got {type(model).__name__}")
        self.tokenizer = load_tokenizer(tokenizer)
        config = self.model.config
        if getattr(config, "num_labels", None) != 1:
            raise ValueError(f"{self._spec}: a reward model has one output (num_labels=1), this one has "
                             f"{getattr(config, 'num_labels', None)}; is it a RewardModule export?")
        pad = self.tokenizer.pad_token_id
        if config.pad_token_id is None:
            config.pad_token_id = pad  # as RewardModule does: the last token is found through it
        elif config.pad_token_id != pad:
            raise ValueError(f"{self._spec}: the model's pad_token_id {config.pad_token_id} is not the tokenizer's "
                             f"{pad}; rows padded with {pad} would be scored at the wrong token. Use the tokenizer "
                             "the model was trained with")
        check_vocab(self.model, len(self.tokenizer))
        self.limit, self.limit_name = length_limit(self.model, max_length, self._spec)
        self.batch_size = batch_size

    def spec(self) -> str:
        return self._spec

    def score_rows(self, prompts: list[Text], responses: list[str]) -> list[Any]:
        if any(isinstance(p, list) for p in prompts) and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self._spec}: the prompts are message lists but the tokenizer has no chat_template")
        out: list[Any] = [None] * len(prompts)
        rendered, rows = [], []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            example = UnpairedExample(prompt, as_completion(prompt, response), True)
            try:
                rendered.append(render_unpaired(example, self.tokenizer, RowRef(self._spec, "judge", i)))
            except DataError as err:  # the chat template failed on this conversation
                out[i] = Failure("could not be rendered", str(err))
                continue
            rows.append(i)
        todo = []
        for i, side in zip(rows, tokenize_completions(rendered, self.tokenizer, _WHOLE)):
            if side.response_length == 0:
                out[i] = Failure("empty response", "no response tokens")
            elif self.limit is not None and len(side.input_ids) > self.limit:
                out[i] = Failure("too long", f"{len(side.input_ids)} tokens > {self.limit_name} {self.limit}")
            else:
                todo.append((i, side.input_ids))
        todo.sort(key=lambda item: len(item[1]))  # similar lengths together: less padding
        for chunk, scores in forward_batches(self.model, todo, self.batch_size,
                                             lambda chunk: self._forward([ids for _, ids in chunk])):
            for (i, _), score in zip(chunk, scores):
                out[i] = score
        return out

    @torch.no_grad()
    def _forward(self, rows: list[list[int]]) -> list[float]:
        device = next(self.model.parameters()).device
        input_ids, attention_mask, _ = padded_inputs(rows, self.tokenizer.pad_token_id, device)  # (b, T)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits[:, 0].float().tolist()  # (b,): the score at each row's last token
