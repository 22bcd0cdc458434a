"""Sequence log-probs against a naive per-token loop; chunking, dtypes, gradients, packing."""

import pytest
import torch

from dpo_lightning.models.logprobs import IGNORE_INDEX, sequence_logps, shift_labels

from tiny import random_batch


def naive_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[int]]:
    """Per-token loop in float64: log p(labels[t] | tokens < t) summed where labels != -100."""
    sums, counts = [], []
    for row in range(labels.shape[0]):
        total, count = 0.0, 0
        for t in range(1, labels.shape[1]):
            y = int(labels[row, t])
            if y == IGNORE_INDEX:
                continue
            total += float(torch.log_softmax(logits[row, t - 1].double(), dim=-1)[y])
            count += 1
        sums.append(total)
        counts.append(count)
    return sums, counts


def test_shift_labels():
    labels = torch.tensor([[-100, 5, 6, -100]])
    assert shift_labels(labels).tolist() == [[5, 6, -100, -100]]


@pytest.mark.parametrize("chunk_elements", [1, 7 * 64, 1 << 26])
def test_matches_naive_loop_fp32(chunk_elements):
    batch = random_batch(b=3, t=10)
    logits = torch.randn(6, 10, 64) * 3
    out = sequence_logps(logits, batch["labels"], chunk_elements=chunk_elements)
    sums, counts = naive_logps(logits, batch["labels"])
    torch.testing.assert_close(out.logps, torch.tensor(sums, dtype=torch.float32), rtol=1e-5, atol=1e-5)
    assert out.n_tokens.tolist() == counts
    assert out.logps.dtype == torch.float32
    # mean logit over the vocabulary, summed over response positions
    mask = shift_labels(batch["labels"]) != IGNORE_INDEX
    expected = (logits.mean(-1) * mask).sum(-1)
    torch.testing.assert_close(out.logits_sum, expected)
    # predictive entropy -sum p log p, summed over response positions
    p = torch.softmax(logits.double(), -1)
    entropy = (-(p * torch.log(p)).sum(-1) * mask).sum(-1)
    torch.testing.assert_close(out.entropy_sum, entropy.float(), rtol=1e-5, atol=1e-5)


def test_bf16_logits_accumulate_in_fp32():
    batch = random_batch(b=2, t=12)
    logits = (torch.randn(4, 12, 64) * 4).to(torch.bfloat16)
    out = sequence_logps(logits, batch["labels"], chunk_elements=3 * 64)
    sums, _ = naive_logps(logits.float(), batch["labels"])
    assert out.logps.dtype == torch.float32
    # Exact up to fp32 rounding of the bf16 values themselves: accumulation is not in bf16.
    torch.testing.assert_close(out.logps, torch.tensor(sums, dtype=torch.float32), rtol=1e-5, atol=1e-4)


def test_gradient_matches_autograd_of_log_softmax():
    batch = random_batch(b=2, t=8)
    logits = torch.randn(4, 8, 64, dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    (sequence_logps(logits, batch["labels"], chunk_elements=5 * 64).logps * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    targets = shift_labels(batch["labels"])
    mask = targets != IGNORE_INDEX
    token = torch.log_softmax(logits, -1).gather(2, targets.clamp_min(0)[..., None]).squeeze(-1)
    ((token * mask).sum(-1) * weights).sum().backward()
    torch.testing.assert_close(ours, logits.grad)


def test_gradcheck_float64():
    batch = random_batch(b=1, t=6, vocab=9)
    logits = torch.randn(2, 6, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: sequence_logps(x, batch["labels"], chunk_elements=2 * 9).logps, (logits,)
    )


def test_bf16_gradient_has_logits_dtype():
    batch = random_batch(b=1, t=6)
    logits = torch.randn(2, 6, 64).to(torch.bfloat16).requires_grad_()
    sequence_logps(logits, batch["labels"]).logps.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    # Prompt and padding positions get no gradient.
    unused = shift_labels(batch["labels"]) == IGNORE_INDEX
    assert logits.grad[unused].abs().sum() == 0


def test_packed_sequences_equal_separate_rows():
    """Two sequences packed in one row give the same sums as the two rows apart."""
    batch = random_batch(b=1, t=6)
    logits = torch.randn(2, 6, 64)
    separate = sequence_logps(logits, batch["labels"])
    lengths = batch["attention_mask"].sum(-1).tolist()
    packed_logits = torch.cat([logits[0, : lengths[0]], logits[1, : lengths[1]]])[None]
    packed_labels = torch.cat([batch["labels"][0, : lengths[0]], batch["labels"][1, : lengths[1]]])[None]
    seq_ids = torch.cat([torch.zeros(lengths[0]), torch.ones(lengths[1])]).long()[None]
    packed = sequence_logps(packed_logits, packed_labels, sequence_ids=seq_ids, num_sequences=2)
    torch.testing.assert_close(packed.logps, separate.logps)
    torch.testing.assert_close(packed.n_tokens, separate.n_tokens)
