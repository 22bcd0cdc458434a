"""Per-sequence log-probabilities of response tokens, from a causal LM's logits.

One function does the job for every loss: shift by one, drop prompt and padding (label
``-100``), gather ``log p(label)`` and sum per sequence, accumulating in float32.

The label log-prob is ``logit[label] - logsumexp(logits)``. Computing ``log_softmax`` over the
whole ``(N, T, V)`` tensor in float32 would cost ``4 * N * T * V`` bytes (8 GiB for 16 rows of
1024 tokens over a 128k vocabulary), so we only visit response positions, in chunks, and a
custom backward recomputes each chunk's softmax instead of keeping it.

``sequence_logps_from_hidden`` goes one step further for training memory: it takes the last
hidden states and the LM head weight, so even the model's own ``(N, T, V)`` logits (and their
gradient) are never built; each chunk of response positions is projected, scored and, in
backward, projected again.
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
    n_correct: Tensor | None = None  # response tokens whose label is the argmax of its logits (detached)
    entropy_sum: Tensor | None = None  # sum over response tokens of the predictive entropy in nats (detached)


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
    logit of each selected row ``(K,)``, whether its label is the row's argmax ``(K,)``
    (1.0 or 0.0) and the entropy of its softmax ``(K,)``. Neither pass holds more than one chunk of float32
    ``(chunk, V)`` values; backward writes the gradient into a tensor of the logits' dtype.
    """

    @staticmethod
    def forward(ctx, flat_logits: Tensor, rows: Tensor, targets: Tensor, chunk: int):  # type: ignore[override]
        # flat_logits: (M, V) any float dtype; rows, targets: (K,) long
        acc = torch.promote_types(flat_logits.dtype, torch.float32)  # float32, or float64 for gradcheck
        token_logps = torch.empty(rows.numel(), dtype=acc, device=flat_logits.device)
        mean_logits, correct, entropy = (torch.empty_like(token_logps) for _ in range(3))
        for start in range(0, rows.numel(), chunk):
            sl = slice(start, start + chunk)
            x = flat_logits.index_select(0, rows[sl]).to(acc)  # (c, V)
            token_logps[sl], mean_logits[sl], correct[sl], entropy[sl] = _token_stats(x, targets[sl])
        ctx.save_for_backward(flat_logits, rows, targets)
        ctx.chunk, ctx.acc = chunk, acc
        ctx.mark_non_differentiable(mean_logits, correct, entropy)
        return token_logps, mean_logits, correct, entropy

    @staticmethod
    def backward(ctx, grad_logps: Tensor, *_grad_stats: Tensor):  # type: ignore[override]
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


def _token_stats(z: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-position statistics of logits ``z`` ``(c, V)`` (float32) and their labels ``(c,)``: the label's
    log-prob, the mean logit, 1.0 where the label is the argmax (the first maximum, as TRL's ``is_top1``)
    and the entropy ``lse(z) - sum softmax(z) * z``; each ``(c,)``."""
    lse = torch.logsumexp(z, dim=-1)  # (c,)
    entropy = lse - (torch.softmax(z, dim=-1) * z).sum(dim=-1)  # (c,)
    logp = z.gather(1, targets[:, None]).squeeze(1) - lse
    return logp, z.mean(dim=-1), (z.argmax(dim=-1) == targets).to(z.dtype), entropy


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
    positions, targets, seq, num_sequences = _response_positions(labels, sequence_ids, num_sequences)
    chunk = max(1, chunk_elements // v)
    flat = logits.reshape(n * t, v)  # (N*T, V)
    token_logps, mean_logits, correct, entropy = _LabelLogProb.apply(flat, positions, targets, chunk)  # (K,) x4
    return _per_sequence(token_logps, mean_logits, correct, entropy, seq, num_sequences)


def _response_positions(
    labels: Tensor, sequence_ids: Tensor | None, num_sequences: int | None
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Flat indices ``(K,)`` of the positions that predict a response token, their targets ``(K,)``,
    the sequence each belongs to ``(K,)``, and the number of sequences."""
    n, t = labels.shape
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
    return positions, flat_targets[positions], sequence_ids.reshape(-1)[positions], int(num_sequences)


def _per_sequence(
    token_logps: Tensor, mean_logits: Tensor, correct: Tensor, entropy: Tensor, seq: Tensor, num_sequences: int
) -> SequenceLogps:
    """Sum per-token values ``(K,)`` into their sequences ``(S,)``."""
    zeros = torch.zeros(num_sequences, dtype=token_logps.dtype, device=token_logps.device)
    return SequenceLogps(
        logps=zeros.index_add(0, seq, token_logps),
        n_tokens=zeros.index_add(0, seq, torch.ones_like(token_logps)),
        logits_sum=zeros.index_add(0, seq, mean_logits),
        n_correct=zeros.index_add(0, seq, correct),
        entropy_sum=zeros.index_add(0, seq, entropy),
    )


# ------------------------------------------------------------------------------------------------
# lean path: from the last hidden states, never building the (N, T, V) logits


class _HiddenLabelLogProb(torch.autograd.Function):
    """``log_softmax(transform(h @ W.T + b))[label]`` for response hidden states ``h`` of shape ``(K, H)``.

    Same contract as :class:`_LabelLogProb`, but the logits are projected chunk by chunk from the
    hidden states inside the function, in forward and again in backward, so at most one
    ``(chunk, V)`` block exists at a time. ``transform`` is the model's own logit post-processing:
    ``z = scale * logits``, then ``z = softcap * tanh(z / softcap)`` when ``softcap`` is set.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, scale, softcap):  # type: ignore[override]
        # hidden: (K, H); weight: (V, H); bias: (V,) or None; targets: (K,) long
        acc = torch.promote_types(hidden.dtype, torch.float32)
        token_logps = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        mean_logits, correct, entropy = (torch.empty_like(token_logps) for _ in range(3))
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            z = _project(hidden[sl], weight, bias, acc, scale, softcap)  # (c, V)
            token_logps[sl], mean_logits[sl], correct[sl], entropy[sl] = _token_stats(z, targets[sl])
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk, ctx.acc, ctx.scale, ctx.softcap = chunk, acc, scale, softcap
        ctx.mark_non_differentiable(mean_logits, correct, entropy)
        return token_logps, mean_logits, correct, entropy

    @staticmethod
    def backward(ctx, grad_logps, *_grad_stats):  # type: ignore[override]
        hidden, weight, bias, targets = ctx.saved_tensors
        acc, scale, softcap = ctx.acc, ctx.scale, ctx.softcap
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None  # (K, H)
        # The weight gradient sums over every chunk: accumulate in float32 (a bf16 running sum drifts).
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None  # (V, H)
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None  # (V,)
        for start in range(0, hidden.shape[0], ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            h = hidden[sl]  # (c, H)
            z = _project(h, weight, bias, acc, scale, softcap)  # (c, V)
            g_out = grad_logps[sl].to(acc)[:, None]  # (c, 1)
            # d/dz [z_y - logsumexp(z)] = onehot(y) - softmax(z)
            g = torch.softmax(z, dim=-1).mul_(-g_out)
            g.scatter_add_(1, targets[sl, None], g_out)
            if softcap is not None:
                g.mul_(1 - (z / softcap) ** 2)  # d/dy [c * tanh(y / c)] = 1 - tanh^2, and tanh = z / c
            if scale != 1.0:
                g.mul_(scale)
            # g is now the gradient w.r.t. the raw logits h @ W.T + b of this chunk: (c, V)
            if grad_h is not None:
                grad_h[sl] = (g.to(weight.dtype) @ weight).to(hidden.dtype)  # (c, H)
            if grad_w is not None:
                grad_w.addmm_(g.T, h.to(acc))  # (V, H)
            if grad_b is not None:
                grad_b.add_(g.sum(dim=0))
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def _project(
    h: Tensor, weight: Tensor, bias: Tensor | None, acc: torch.dtype, scale: float, softcap: float | None
) -> Tensor:
    """The model's logits for hidden states ``h`` ``(c, H)`` -> ``(c, V)`` in ``acc``.

    The matmul runs in the weights' dtype, as the model's own LM head does; the rest in ``acc``.
    """
    z = torch.nn.functional.linear(h, weight, bias).to(acc)  # (c, V)
    if scale != 1.0:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def sequence_logps_from_hidden(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    lm_head_bias: Tensor | None = None,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    sequence_ids: Tensor | None = None,
    num_sequences: int | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> SequenceLogps:
    """:func:`sequence_logps` from the last hidden states, without ever forming the ``(N, T, V)`` logits.

    Only positions that predict a response token are projected through the LM head, in chunks of
    ``chunk_elements // V`` positions, and backward recomputes each chunk. Equal in value and
    gradient (w.r.t. ``hidden``, ``lm_head_weight`` and ``lm_head_bias``) to
    ``sequence_logps(transform(hidden @ lm_head_weight.T + lm_head_bias), labels)``.

    Args:
        hidden: ``(N, T, H)`` output of the model's backbone (after its final norm).
        lm_head_weight: ``(V, H)`` LM head (output embedding) weight.
        labels: ``(N, T)`` unshifted labels, ``-100`` off the response.
        lm_head_bias: optional ``(V,)`` LM head bias.
        logit_scale: factor the model multiplies its logits by (Cohere ``logit_scale``, 1 / Granite
            ``logits_scaling``); applied before the softcap.
        logit_softcap: ``c`` in ``c * tanh(logits / c)`` (Gemma 2 ``final_logit_softcapping``).
        sequence_ids, num_sequences, chunk_elements: as in :func:`sequence_logps`.
    """
    n, t, h = hidden.shape
    v = lm_head_weight.shape[0]
    positions, targets, seq, num_sequences = _response_positions(labels, sequence_ids, num_sequences)
    response_hidden = hidden.reshape(n * t, h).index_select(0, positions)  # (K, H)
    chunk = max(1, chunk_elements // v)
    token_logps, mean_logits, correct, entropy = _HiddenLabelLogProb.apply(
        response_hidden, lm_head_weight, lm_head_bias, targets, chunk, float(logit_scale), logit_softcap
    )  # (K,) x4
    return _per_sequence(token_logps, mean_logits, correct, entropy, seq, num_sequences)
