"""Judge functions for the generation tests."""


def picky(prompt: str, response: str) -> float:
    """Fails on responses with an odd number of words."""
    words = response.split()
    if len(words) % 2:
        raise ValueError(f"odd number of words: {len(words)}")
    return float(len(words))


def constant(prompt: str, response: str) -> float:
    """Every response scores the same: a round where the judge ties every sample (no pair)."""
    return 1.0
