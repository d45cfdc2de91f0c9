"""Generative recommendation: predict a user's next item from their history (NEZHA's task).

Items are semantic IDs: 3 levels of codes (`codes` per level, one character each, `a` for
code 0), and only a small share of the code combinations are real items (the catalogue).
Items share a first-level code with the others of their category. A user has two interest
categories; their history follows a process with structure: mostly each item's fixed
successor (a sequential pattern within its category), sometimes another item of the same
category, sometimes a jump to the other interest. So the next item is predictable.

    task = make_task("recommend", {"codes": 24, "items": 256}, seed=0)
    ex = task.example("train", 0)
    ex.prompt   # 'dkq dfa hbc ... #%_>'  the history's items, then one placeholder per level
    ex.answer   # 'dfr'                   the next item; meta["next"] holds the next 3

The prompt ends with the levels' placeholders (`#%_`) and an end marker (`>`), as NEZHA's
[history, SP_1 … SP_L, EOS]. A plain language model answers with the item's characters;
NEZHA's draft head reads the hidden states at the placeholders instead
(rollfleet.models.nezha). Held-out users are drawn from another random stream.

`PrefixVerifier` is NEZHA's model-free check of generated items: the set of every valid
prefix packed into one integer. The torch engine's decode mode and the `item_valid`
reward share it.
"""

from __future__ import annotations

import functools
import math
import random
import zlib
from dataclasses import dataclass

from rollfleet.tasks import Example, Split, Task, register_task

LEVELS = 3
CODE_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"  # code i of any level is CODE_CHARS[i]
PLACEHOLDERS = "#%_"  # one per level, after the history
END = ">"


def item_text(item: tuple[int, ...]) -> str:
    return "".join(CODE_CHARS[c] for c in item)


def item_codes(text: str) -> tuple[int, ...] | None:
    """The codes of an item's text, or None when it is not LEVELS code characters."""
    text = text.strip()
    if len(text) != LEVELS or any(ch not in CODE_CHARS for ch in text):
        return None
    return tuple(CODE_CHARS.index(ch) for ch in text)


@dataclass(frozen=True)
class Catalogue:
    """The real items (code tuples) and each one's successor in its category's cycle."""

    codes: int
    items: tuple[tuple[int, ...], ...]
    successor: dict[tuple[int, ...], tuple[int, ...]]
    categories: dict[int, tuple[tuple[int, ...], ...]]  # first-level code -> its items


@functools.cache
def make_catalogue(seed: int, codes: int, items: int, branching: int = 4) -> Catalogue:
    """`items` distinct items: each category (first-level code) uses `branching` second-level
    codes, the third level is free; categories are balanced. Deterministic in the arguments."""
    if not 2 <= codes <= len(CODE_CHARS):
        raise ValueError(f"task.params.codes={codes}: choose 2 to {len(CODE_CHARS)}")
    if not codes <= items <= codes * branching * codes // 2:
        raise ValueError(
            f"task.params.items={items}: choose {codes} to {codes * branching * codes // 2} "
            f"(at least one per category, at most half the combinations of {codes} codes)"
        )
    rng = random.Random(zlib.crc32(f"catalogue/{seed}".encode()))
    second = {a: rng.sample(range(codes), min(branching, codes)) for a in range(codes)}
    chosen: set[tuple[int, ...]] = set()
    category = 0
    while len(chosen) < items:  # round robin over categories keeps them balanced
        chosen.add((category, rng.choice(second[category]), rng.randrange(codes)))
        category = (category + 1) % codes
    ordered = tuple(sorted(chosen))
    categories: dict[int, list[tuple[int, ...]]] = {}
    for item in ordered:
        categories.setdefault(item[0], []).append(item)
    successor = {}
    for members in categories.values():
        cycle = rng.sample(members, len(members))
        for i, item in enumerate(cycle):
            successor[item] = cycle[(i + 1) % len(cycle)]
    return Catalogue(
        codes, ordered, successor, {a: tuple(m) for a, m in sorted(categories.items())}
    )


class PrefixVerifier:
    """Every valid prefix of a catalogue's items, each packed into one integer (its codes in
    base `codes`, then its length in the low two bits), in a hash set. A full-length prefix
    is valid only if it is an item, so the last level is checked against the catalogue.

    `valid(prefix)` checks one; `allowed(prefixes, width)` is the batched form beam search
    uses: which of `width` next codes extend each prefix [N, length] validly ([N, width]
    bool; torch.isin over the packed keys)."""

    def __init__(self, items, codes: int):
        self.codes = codes
        self.keys = frozenset(
            self.pack(item[:length]) for item in items for length in range(1, len(item) + 1)
        )
        self._sorted = None  # the keys as a sorted tensor, made on first batched use

    def pack(self, prefix) -> int:
        value = 0
        for code in prefix:
            value = value * self.codes + int(code)
        return (value << 2) | len(prefix)

    def valid(self, prefix) -> bool:
        return all(0 <= c < self.codes for c in prefix) and self.pack(prefix) in self.keys

    def allowed(self, prefixes, width: int):
        import torch

        if self._sorted is None:
            self._sorted = torch.tensor(sorted(self.keys), dtype=torch.long)
        rows, length = prefixes.shape
        value = torch.zeros(rows, dtype=torch.long, device=prefixes.device)
        for level in range(length):
            value = value * self.codes + prefixes[:, level]
        code = torch.arange(width, device=prefixes.device)
        keys = ((value[:, None] * self.codes + code) << 2) | (length + 1)
        in_range = (code < self.codes).expand(rows, width)
        return in_range & torch.isin(keys, self._sorted.to(prefixes.device))


@functools.cache
def verifier_for(seed: int, codes: int, items: int) -> PrefixVerifier:
    return PrefixVerifier(make_catalogue(seed, codes, items).items, codes)


def hit_rate(ranked: list[str], target: str, k: int) -> float:
    """HR@k: 1 if the target is among the first k recommendations."""
    return float(target in ranked[:k])


def ndcg(ranked: list[str], target: str, k: int) -> float:
    """NDCG@k with one relevant item: 1 / log2(rank + 1) if it is ranked within k."""
    for rank, item in enumerate(ranked[:k], start=1):
        if item == target:
            return 1.0 / math.log2(rank + 1)
    return 0.0


@register_task("recommend")
class Recommend(Task):
    """Next-item prediction over a synthetic catalogue (see the module docstring)."""

    name = "recommend"
    default_reward = "recommend"

    def __init__(
        self,
        seed: int = 0,
        codes: int = 24,
        items: int = 256,
        history: int = 8,
        next_items: int = 3,
        follow: float = 0.7,
        stay: float = 0.2,
        heldout_size: int = 500,
    ):
        if history < 1 or next_items < 1:
            raise ValueError("task.params.history and next_items must be at least 1")
        if min(follow, stay) < 0 or follow + stay > 1:
            raise ValueError("task.params.follow and stay: shares from 0 with follow + stay <= 1")
        self.seed, self.codes, self.items = seed, codes, items
        self.catalogue = make_catalogue(seed, codes, items)
        self.history, self.next_items = history, next_items
        self.follow, self.stay = follow, stay
        self.heldout_size = heldout_size

    def size(self, split: Split) -> int | None:
        return self.heldout_size if split == "heldout" else None

    def sequence(self, rng: random.Random) -> list[tuple[int, ...]]:
        """One user's items: `history` of them, then `next_items` (their future)."""
        cat = self.catalogue
        interests = rng.sample(sorted(cat.categories), 2)
        item = rng.choice(cat.categories[interests[0]])
        sequence = [item]
        for _ in range(self.history + self.next_items - 1):
            draw = rng.random()
            if draw < self.follow:
                item = cat.successor[item]
            elif draw < self.follow + self.stay:
                item = rng.choice(cat.categories[item[0]])
            else:
                other = interests[1] if item[0] == interests[0] else interests[0]
                item = rng.choice(cat.categories[other])
            sequence.append(item)
        return sequence

    def example(self, split: Split, index: int) -> Example:
        rng = random.Random(zlib.crc32(f"{self.seed}/{split}/{index}".encode()))
        sequence = [item_text(i) for i in self.sequence(rng)]
        seen, upcoming = sequence[: self.history], sequence[self.history :]
        return Example(
            id=f"{split}-{index}",
            prompt=" ".join(seen) + " " + PLACEHOLDERS + END,
            answer=upcoming[0],
            meta={
                "next": upcoming,
                "catalogue": {"seed": self.seed, "codes": self.codes, "items": self.items},
            },
            demonstration=(("model", upcoming[0]),),
        )
