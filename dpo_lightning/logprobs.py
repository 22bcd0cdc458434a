"""Per-sequence log-probabilities of response tokens, from a causal LM's logits.

One function does the job for every loss: shift by one, drop prompt and padding (label
``-100``), gather ``log p(label)`` and sum per sequence, accumulating in float32.

The label log-prob is ``logit[label] - logsumexp(logits)``. Computing ``log_softmax`` over the
whole ``(N, T, V)`` tensor in float32 would cost ``4 * N * T * V`` bytes (8 GiB for 16 rows of
1024 tokens over a 128k vocabulary), so we only visit response positions, in chunks, and a
custom backward recomputes each chunk's softmax instead of keeping it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

IGNORE_INDEX = -100
# Elements of float32 work per chunk (~256 MiB): positions per chunk = budget // vocab size.
DEFAULT_CHUNK_ELEMENTS = 1 << 26


class SequenceLogps(NamedTuple):
    """Per-sequence statistics over response tokens; every field has shape ``(N,)``.

    Float32 whatever the model's dtype (float64 for float64 logits).
    """

    logps: Tensor  # sum of log p(label) over response tokens (differentiable)
    n_tokens: Tensor  # number of response tokens
    logits_sum: Tensor  # sum over response tokens of the mean logit over the vocabulary (detached)


def shift_labels(labels: Tensor) -> Tensor:
    """Align labels with the logits that predict them: ``(N, T) -> (N, T)``.

    Position ``t`` of the result holds the label predicted by the logits at ``t``, i.e.
    ``labels[:, t + 1]``; the last position gets ``-100``.
    """
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


class _LabelLogProb(torch.autograd.Function):
    """``log_softmax(logits)[label]`` at selected rows of a flat ``(M, V)`` logits tensor.

    Forward returns the label log-probs ``(K,)`` in float32 and, non-differentiable, the mean
    logit of each selected row ``(K,)``. Neither pass holds more than one chunk of float32
    ``(chunk, V)`` values; backward writes the gradient into a tensor of the logits' dtype.
    """

    @staticmethod
    def forward(ctx, flat_logits: Tensor, rows: Tensor, targets: Tensor, chunk: int):  # type: ignore[override]
        # flat_logits: (M, V) any float dtype; rows, targets: (K,) long
        acc = torch.promote_types(flat_logits.dtype, torch.float32)  # float32, or float64 for gradcheck
        token_logps = torch.empty(rows.numel(), dtype=acc, device=flat_logits.device)
        mean_logits = torch.empty_like(token_logps)
        for start in range(0, rows.numel(), chunk):
            sl = slice(start, start + chunk)
            x = flat_logits.index_select(0, rows[sl]).to(acc)  # (c, V)
            lse = torch.logsumexp(x, dim=-1)  # (c,)
            token_logps[sl] = x.gather(1, targets[sl, None]).squeeze(1) - lse
            mean_logits[sl] = x.mean(dim=-1)
        ctx.save_for_backward(flat_logits, rows, targets)
        ctx.chunk, ctx.acc = chunk, acc
        ctx.mark_non_differentiable(mean_logits)
        return token_logps, mean_logits

    @staticmethod
    def backward(ctx, grad_logps: Tensor, _grad_mean: Tensor):  # type: ignore[override]
        flat_logits, rows, targets = ctx.saved_tensors
        grad = torch.zeros_like(flat_logits)  # (M, V), logits dtype
        for start in range(0, rows.numel(), ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            x = flat_logits.index_select(0, rows[sl]).to(ctx.acc)  # (c, V)
            g_out = grad_logps[sl].to(ctx.acc)[:, None]  # (c, 1)
            # d/dx [x_y - logsumexp(x)] = onehot(y) - softmax(x)
            g = torch.softmax(x, dim=-1).mul_(-g_out)
            g.scatter_add_(1, targets[sl, None], g_out)
            grad.index_copy_(0, rows[sl], g.to(grad.dtype))
        return grad, None, None, None


def sequence_logps(
    logits: Tensor,
    labels: Tensor,
    *,
    sequence_ids: Tensor | None = None,
    num_sequences: int | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> SequenceLogps:
    """Sum the log-probs of response tokens per sequence.

    Args:
        logits: ``(N, T, V)`` model output, any float dtype.
        labels: ``(N, T)`` unshifted labels: token ids on response tokens, ``-100`` elsewhere.
        sequence_ids: optional ``(N, T)`` index of the sequence each position belongs to, for
            rows that pack several sequences; by default each row is one sequence.
        num_sequences: number of sequences when ``sequence_ids`` is given.
        chunk_elements: float32 elements processed at once (bounds the extra memory).

    Returns:
        :class:`SequenceLogps` with ``(S,)`` float32 fields, ``S = N`` unless packed.
    """
    n, t, v = logits.shape
    targets = shift_labels(labels)  # (N, T)
    if sequence_ids is None:
        sequence_ids = torch.arange(n, device=labels.device)[:, None].expand(n, t)  # (N, T)
        num_sequences = n
    elif num_sequences is None:
        raise ValueError("num_sequences is required with sequence_ids")
    else:
        # The target at t belongs to the sequence of the label at t + 1.
        sequence_ids = shift_labels(sequence_ids).clamp_min(0)

    flat_targets = targets.reshape(-1)  # (N*T,)
    positions = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)  # (K,)
    chunk = max(1, chunk_elements // v)
    token_logps, mean_logits = _LabelLogProb.apply(
        logits.reshape(n * t, v), positions, flat_targets[positions], chunk
    )  # (K,), (K,)

    seq = sequence_ids.reshape(-1)[positions]  # (K,)
    zeros = torch.zeros(num_sequences, dtype=token_logps.dtype, device=logits.device)
    logps = zeros.index_add(0, seq, token_logps)
    n_tokens = zeros.index_add(0, seq, torch.ones_like(token_logps))
    logits_sum = zeros.index_add(0, seq, mean_logits)
    return SequenceLogps(logps=logps, n_tokens=n_tokens, logits_sum=logits_sum)
