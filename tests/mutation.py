"""Random edits of a text, for the recognisers' tests against reference parsers."""

import random


def mutate(rng: random.Random, text: list | bytearray, alphabet) -> None:
    """One or two random deletions, insertions or replacements (from `alphabet`), in place."""
    for _ in range(rng.randint(1, 2)):
        at = rng.randrange(len(text) + 1)
        op = rng.randrange(3)
        if op == 0 and at < len(text):
            del text[at]
        elif op == 1:
            text.insert(at, rng.choice(alphabet))
        elif at < len(text):
            text[at] = rng.choice(alphabet)
