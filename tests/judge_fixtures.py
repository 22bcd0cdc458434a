"""A judge function for the generation tests: fails on responses with an odd number of words."""


def picky(prompt: str, response: str) -> float:
    words = response.split()
    if len(words) % 2:
        raise ValueError(f"odd number of words: {len(words)}")
    return float(len(words))
