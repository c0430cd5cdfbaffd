"""Synthetic reasoning datasets: seeded generators of trace-format records.

Each generator is a pure function of ``(n, seed, options)`` and returns tunix-rt trace records
(``{trace_version, prompt, steps, final_answer, meta}``) with ``meta`` = {generator, seed, index,
category, id}; :func:`mlflow_tunix.data.examples_from_records` checks them as it checks a file.
``generate(name, ...)`` is what projects (``data.train: [{generator: ...}]``) and
``mlflow-tunix data generate`` call.
"""

from __future__ import annotations

import inspect
import random
from typing import Callable

from mlflow_tunix.errors import ConfigError, short

# Ceilings (documented in docs/design.md), refused before any record is made: a million records is
# more than any project here trains on, and a 100-digit sum's trace (one line per digit) already
# outgrows every context these models have (Python also refuses to print ints over 4300 digits).
MAX_N = 1_000_000
MAX_DIGITS = 100


def _check_n(name: str, n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"generator {name!r}: n must be a positive integer, got {short(n)}")
    if n > MAX_N:
        raise ConfigError(f"generator {name!r}: n must be at most {MAX_N}, got {n}")
    return n


def _trace(name: str, seed: int, index: int, category: str, prompt: str, steps, answer: str) -> dict:
    return {
        "trace_version": "1.0",
        "prompt": prompt,
        "steps": [{"i": i, "type": "step", "content": s} for i, s in enumerate(steps)],
        "final_answer": answer,
        "meta": {
            "generator": name,
            "seed": seed,
            "index": index,
            "category": category,
            "id": f"{name}-{seed}-{index}",
        },
    }


def addition_steps(a: int, b: int) -> list[str]:
    """The column-by-column scratchpad, least significant digit first: "da+db+carry=sum".

    The shorter operand is padded with 0s. The last column's sum is written in full, so the
    answer reads as that sum followed by the other columns' last digits, right to left.
    """
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for k in range(max(len(da), len(db))):
        x = int(da[k]) if k < len(da) else 0
        y = int(db[k]) if k < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}")
        carry = s // 10
    return steps


def _digit_range(digits) -> tuple[int, int]:
    if isinstance(digits, int) and not isinstance(digits, bool):
        digits = (digits, digits)
    ok = (
        isinstance(digits, (tuple, list))
        and len(digits) == 2
        and all(isinstance(d, int) and not isinstance(d, bool) for d in digits)
        and 1 <= digits[0] <= digits[1] <= MAX_DIGITS
    )
    if not ok:
        raise ConfigError(
            f"generator 'addition': digits must be (min, max) operand lengths with 1 <= min <= max <= {MAX_DIGITS}, "
            f"got {short(digits)}"
        )
    return digits[0], digits[1]


def _operands_with(k: int) -> tuple[int, int]:
    """The inclusive range of numbers with exactly k digits (k=1 includes 0)."""
    return (0, 9) if k == 1 else (10 ** (k - 1), 10**k - 1)


def addition(n: int = 1000, seed: int = 0, *, digits=(1, 4), trace: bool = True) -> list[dict]:
    """ "What is a + b?" with the column scratchpad; unique (a, b) pairs. Each operand's length
    is drawn from the inclusive ``digits`` range independently of the other's."""
    n = _check_n("addition", n)
    lo, hi = _digit_range(digits)
    if not isinstance(trace, bool):
        raise ConfigError(f"generator 'addition': trace must be true or false, got {trace!r}")
    n_operands = sum(_operands_with(k)[1] - _operands_with(k)[0] + 1 for k in range(lo, hi + 1))
    if n > n_operands**2:
        raise ConfigError(
            f"generator 'addition': n={n} but digits={lo, hi} allows only {n_operands**2} distinct pairs"
        )
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    records = []
    # Rejection sampling keeps the length distribution simple; give up (deterministically) if
    # the range is nearly exhausted rather than loop for a very long time.
    for _ in range(100 * n + 10_000):
        if len(records) == n:
            break
        a = rng.randint(*_operands_with(rng.randint(lo, hi)))
        b = rng.randint(*_operands_with(rng.randint(lo, hi)))
        if (a, b) in seen:
            continue
        seen.add((a, b))
        category = f"{max(len(str(a)), len(str(b)))}-digit"
        steps = addition_steps(a, b) if trace else []
        records.append(
            _trace("addition", seed, len(records), category, f"What is {a} + {b}?", steps, str(a + b))
        )
    if len(records) < n:
        raise ConfigError(
            f"generator 'addition': found only {len(records)} distinct pairs for n={n}; "
            f"widen digits={lo, hi} or lower n"
        )
    return records


GOLDEN_WORDS = ("apple", "banana", "cherry", "date", "elderberry")


def golden_v2(n: int = 100, seed: int = 42) -> list[dict]:
    """tunix-rt's golden-v2 set: n//2 additions of 1..100, then n - n//2 "Repeat 'w' k times".

    The random calls are made in tunix-rt's order (tools/seed_dataset.py, generate_golden_v2), so
    seed=42 (the default) and n=100 give the same prompts, steps and answers as tunix-rt's set.
    """
    n = _check_n("golden-v2", n)
    rng = random.Random(seed)
    records = []
    for i in range(n // 2):
        a = rng.randint(1, 100)
        b = rng.randint(1, 100)
        steps = [f"Calculating {a} + {b} = {a + b}"]
        records.append(_trace("golden-v2", seed, i, "arithmetic", f"What is {a} + {b}?", steps, str(a + b)))
    for i in range(n // 2, n):
        w = rng.choice(GOLDEN_WORDS)
        k = rng.randint(2, 5)
        steps = [f"Repeating {w} {k} times"]  # tunix-rt's wording (no quotes)
        prompt = f"Repeat '{w}' {k} times"
        records.append(_trace("golden-v2", seed, i, "repeat", prompt, steps, " ".join([w] * k)))
    return records


PLAYERS = ("Alice", "Bob", "Carol", "Dave")
RANKS = ("2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K", "A")
RANK_VALUE = {r: v for v, r in enumerate(RANKS, start=2)}
SUITS = ("S", "H", "D", "C")


def high_card_steps(first: str, first_cards, second: str, second_cards) -> tuple[list[str], str, str]:
    """Steps, answer and category for one duel. Cards are (rank, suit) pairs.

    Each hand is listed high to low with its values; the hands are compared card by card from
    the top until one is higher. Category: "decided-by-card-k" (k = 1..3) or "tie".
    """
    values = []
    steps = []
    for name, cards in ((first, first_cards), (second, second_cards)):
        ranked = sorted((RANK_VALUE[r] for r, _ in cards), reverse=True)
        values.append(ranked)
        by_value = {RANK_VALUE[r]: r for r, _ in cards}
        steps.append(f"{name}: " + " ".join(f"{by_value[v]}({v})" for v in ranked))
    for k, (x, y) in enumerate(zip(*values), start=1):
        if x == y:
            steps.append(f"{x} = {y}")
            continue
        steps.append(f"{x} > {y}" if x > y else f"{x} < {y}")
        winner = first if x > y else second
        steps.append(f"{winner} wins")
        return steps, winner, f"decided-by-card-{k}"
    steps.append("Tie")
    return steps, "Tie", "tie"


def _show(hand) -> str:
    return " ".join(rank + suit for rank, suit in hand)  # "KS 9H 10D"


def high_card(n: int = 1000, seed: int = 0) -> list[dict]:
    """A high-card duel: two players show 3 cards each (one deck); the higher hand, compared
    card by card from the top, wins."""
    n = _check_n("high-card", n)
    rng = random.Random(seed)
    deck = [(r, s) for r in RANKS for s in SUITS]
    records = []
    for i in range(n):
        first, second = rng.sample(PLAYERS, 2)
        cards = rng.sample(deck, 6)
        a, b = cards[:3], cards[3:]
        prompt = f"High card: {first} has {_show(a)}; {second} has {_show(b)}. Who wins?"
        steps, answer, category = high_card_steps(first, a, second, b)
        records.append(_trace("high-card", seed, i, category, prompt, steps, answer))
    return records


GENERATORS: dict[str, Callable[..., list[dict]]] = {
    "addition": addition,
    "golden-v2": golden_v2,
    "high-card": high_card,
}


def generate(name: str, n: int | None = None, seed: int | None = None, **options) -> list[dict]:
    """Records from a named generator; n=None / seed=None take the generator's own defaults."""
    if name not in GENERATORS:
        raise ConfigError(f"unknown generator {name!r} (allowed: {', '.join(GENERATORS)})")
    fn = GENERATORS[name]
    allowed = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    for key in options:
        if key not in allowed:
            raise ConfigError(
                f"unknown option {key!r} for generator {name!r} (allowed: {', '.join(allowed) or 'none'})"
            )
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"generator {name!r}: seed must be an integer, got {short(seed)}")
    args = {"n": n, "seed": seed}
    return fn(**{k: v for k, v in args.items() if v is not None}, **options)
