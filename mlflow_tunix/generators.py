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


# --------------------------------------------------------------------------------------------
# tunix-rt's dev-reasoning-v2 families, with scratchpads a small model can execute
#
# Each family is a function (rng) -> (prompt, steps, answer). The answers are formatted exactly
# as tunix-rt formats them (its score is strip + lower equality): "472 km", "95.48", "648.0",
# "$31.5", "-20". The scratchpads work one digit or one letter per move, least significant digit
# first where carries run, so every token the model writes depends on a few tokens before it.
# Measured on tunix-rt's file (projects/reasoning): what a 2-layer model could not learn it was
# given as a written step instead: the comparison before a subtraction digit by digit ("7=7 2<5"),
# the divisor's multiples and each remainder as a subtraction in long division, the two names side
# by side before a syllogism's verdict, and a place number before every letter it copies ("1r 2e").


def _mul_digit_steps(a: int, d: int) -> str:
    """a * d (d one digit), column by column from the right: "341*8: 1*8+0=8 4*8+0=32 3*8+3=27 =2728"."""
    cols, carry = [], 0
    for x in map(int, reversed(str(a))):
        v = x * d + carry
        cols.append(f"{x}*{d}+{carry}={v}")
        carry = v // 10
    return f"{a}*{d}: " + " ".join(cols) + f" ={a * d}"


def _add_line(a: int, b: int) -> str:
    """Column addition as one line: "2728+6820: 8+0+0=8 2+2+0=4 ... =9548"."""
    return f"{a}+{b}: " + " ".join(addition_steps(a, b)) + f" ={a + b}"


def multiplication_steps(a: int, b: int) -> list[str]:
    """a * b through partial products: a times each digit of b (a line each), then the partials,
    shifted, added column by column (one line per addition)."""
    digits = list(map(int, reversed(str(b))))
    steps = [_mul_digit_steps(a, d) for d in digits]
    total = a * digits[0]
    for k, d in enumerate(digits[1:], start=1):
        steps.append(_add_line(total, a * d * 10**k))
        total += a * d * 10**k
    return steps


def comparison(a: int, b: int) -> str:
    """a against b digit by digit from the left (the shorter padded with zeros), up to the first
    digits that differ: "7=7 2<5". One digit pair at a time, so a small model never compares two
    whole numbers at once."""
    width = max(len(str(a)), len(str(b)))
    pairs = []
    for x, y in zip(str(a).zfill(width), str(b).zfill(width)):
        pairs.append(f"{x}{'=' if x == y else '<' if x < y else '>'}{y}")
        if x != y:
            break
    return " ".join(pairs)


def subtraction_steps(a: int, b: int) -> list[str]:
    """a - b: which is larger (digit by digit, see comparison), then the larger minus the smaller,
    column by column with borrows ("15-7-0=8" borrows the 1), the sign in front when a < b."""
    big, small = max(a, b), min(a, b)
    verdict = f"{a}<{b} so -({b}-{a})" if a < b else f"{a}>={b}"
    steps = [f"{a}?{b}: {comparison(a, b)} so {verdict}"]
    db, ds = str(big)[::-1], str(small)[::-1]
    cols, borrow = [], 0
    for k in range(len(db)):
        x, y = int(db[k]), int(ds[k]) if k < len(ds) else 0
        v = x - y - borrow
        nb = 1 if v < 0 else 0
        cols.append(f"{x + 10 * nb}-{y}-{borrow}={v + 10 * nb}")
        borrow = nb
    steps.append(f"{big}-{small}: " + " ".join(cols) + f" ={big - small}")
    return steps


def _two_decimals(hundredths: int) -> str:
    """tunix-rt's str(round(x, 2)): at most two decimals, trailing zeros dropped but one kept ("648.0")."""
    whole, frac = divmod(hundredths, 100)
    return f"{whole}.{frac // 10}" if frac % 10 == 0 else f"{whole}.{frac:02d}"


def division_steps(total: int, n: int) -> tuple[list[str], int]:
    """Long division of total by n to three decimals, then rounding to cents as Python's round()
    does on these numbers (half up, except an exact tie, which goes to the even cent).
    Returns (steps, the result in hundredths)."""
    # n's multiples first ("1:7 2:14 ... 9:63"): each column then looks its quotient digit up as the
    # largest multiple <= the column's number instead of recalling x // n for n up to 25.
    multiples = f"{n}: " + " ".join(f"{k}:{n * k}" for k in range(1, 10))
    cols, r = [], 0
    digits = list(map(int, str(total))) + [0, 0, 0]
    q = 0
    for d in digits:
        x = r * 10 + d
        cols.append(f"{x}/{n}={x // n} {x}-{x // n * n}={x % n}")  # the remainder as a written subtraction
        q, r = q * 10 + x // n, x % n
    thousandths = q
    steps = [multiples, f"{total}/{n}: " + " ".join(cols), f"={q // 1000}.{q % 1000:03d} r{r}"]
    cents, last = divmod(thousandths, 10)
    up = last > 5 or (last == 5 and (r > 0 or cents % 2 == 1))
    rounded = cents + up
    if last == 5 and r == 0:
        steps.append(f"tie: {'up' if up else 'down'} to even")
    steps.append(f"round: {cents // 100}.{cents % 100:02d}" + (f"+0.01={rounded // 100}.{rounded % 100:02d}" if up else ""))
    return steps, rounded


DISTANCE_PROMPTS = (
    ("A train travels at {s} km/h for {t} hours. How far does it travel?", "km"),
    ("A train travels at {s} km/h for {t} hours. How far does it travel?", "km"),
    ("A car drives at {s} km/h for {t} hours. How far does it go?", "km"),
    ("A bus moves at {s} km/h for {t} hours. What distance does it cover?", "km"),
    ("How far does a train go in {t} hours at {s} km/h?", "km"),
    ("A cyclist rides at {s} mph for {t} hours. How far does she ride?", "miles"),
)


def _distance(rng):
    s, t = rng.randint(10, 150), rng.randint(1, 9)
    template, unit = rng.choice(DISTANCE_PROMPTS)
    steps = [_mul_digit_steps(s, t)]
    return template.format(s=s, t=t), steps, f"{s * t} {unit}"


PERCENT_PROMPTS = ("What is {p}% of {b}?", "What is {p}% of {b}?", "Find {p}% of {b}.", "Calculate {p} percent of {b}.",
                   "What is {p} % of {b}?")


def _percent(rng):
    p = rng.randint(1, 99) if rng.random() < 0.2 else rng.randint(10, 99)
    b = rng.randint(100, 999) if rng.random() < 0.8 else rng.randint(10, 99)
    steps = multiplication_steps(b, p)
    answer = _two_decimals(b * p)
    steps.append(f"{b * p}/100={answer}")
    return rng.choice(PERCENT_PROMPTS).format(p=p, b=b), steps, answer


UNIT_COST_PROMPTS = (
    "If {n} items cost ${t}, what is the cost per item?",
    "If {n} items cost ${t}, what is the cost per item?",
    "{n} items cost ${t} in total. How much does one item cost?",
    "If {n} tickets cost ${t}, what is the price of one ticket?",
    "A pack of {n} pens costs ${t}. What does each pen cost?",
)


def _unit_cost(rng):
    n, t = rng.randint(2, 25), rng.randint(10, 250)
    steps, cents = division_steps(t, n)
    answer = "$" + _two_decimals(cents)
    return rng.choice(UNIT_COST_PROMPTS).format(n=n, t=t), steps, answer


def _two_digits(rng):
    return rng.randint(10, 99), rng.randint(10, 99)


ADD_PROMPTS = ("Calculate {a} + {b} step by step.", "Calculate {a} + {b} step by step.", "Add {a} and {b} step by step.",
               "What is {a} + {b}? Show your steps.", "Compute {a} + {b} step by step.")
SUB_PROMPTS = ("Calculate {a} - {b} showing your work.", "Calculate {a} - {b} showing your work.",
               "Subtract {b} from {a}, showing your work.", "What is {a} - {b}? Show your work.",
               "Compute {a} - {b} showing your work.")
MUL_PROMPTS = ("Multiply {a} × {b} step by step.", "Multiply {a} × {b} step by step.", "Multiply {a} by {b} step by step.",
               "What is {a} × {b}? Show your steps.", "Compute {a} × {b} step by step.")


def _add_steps(rng):
    a, b = _two_digits(rng)
    return rng.choice(ADD_PROMPTS).format(a=a, b=b), [_add_line(a, b)], str(a + b)


def _subtract_steps(rng):
    a, b = _two_digits(rng)
    return rng.choice(SUB_PROMPTS).format(a=a, b=b), subtraction_steps(a, b), str(a - b)


def _multiply_steps(rng):
    a, b = _two_digits(rng)
    return rng.choice(MUL_PROMPTS).format(a=a, b=b), multiplication_steps(a, b), str(a * b)


ARITHMETIC_PROMPTS = ("Calculate: {a} {op} {b}", "Calculate: {a} {op} {b}", "Compute: {a} {op} {b}",
                      "Evaluate: {a} {op} {b}", "Calculate {a} {op} {b}")


def _arithmetic(rng):
    a, b, op = rng.randint(1, 99), rng.randint(1, 99), rng.choice("+-*")
    if op == "+":
        steps, answer = [_add_line(a, b)], a + b
    elif op == "-":
        steps, answer = subtraction_steps(a, b), a - b
    else:
        steps, answer = multiplication_steps(a, b), a * b
    return rng.choice(ARITHMETIC_PROMPTS).format(a=a, op=op, b=b), steps, str(answer)


# (plural of the class, the wider class): "all fish are animals"
KINDS = (("fish", "animals"), ("dogs", "mammals"), ("birds", "animals"), ("flowers", "plants"), ("trees", "plants"),
         ("cars", "vehicles"), ("snakes", "reptiles"), ("fruits", "foods"), ("cats", "pets"), ("tools", "objects"))
LOGIC_PROMPTS = ("If all {cls} are {wider}, and this is a {x} (which is a {c}), is it {w}?",
                 "If all {cls} are {wider}, and this is a {x} (which is a {c}), is it {w}?",
                 "All {cls} are {wider}. This is a {x} (which is a {c}). Is it {w}?",
                 "Suppose all {cls} are {wider}, and this is a {x} (which is a {c}). Is it {w}?")


def _logic(rng):
    """tunix-rt's syllogism ("...which is a fis), is it animal?": it cuts the last letter of the
    plurals). Yes when the thing's class is the premise's, No when it is another.
    Half the classes are made-up words ("all zorbs are things"), so the answer comes from comparing
    the two names, and Yes prompts are as many and as varied as No ones."""
    if rng.random() < 0.5:
        cls, wider = rng.choice(KINDS)
        other = rng.choice([k for k in KINDS if k[0] != cls and k[1] != wider])[0][:-1]
    else:
        # The class is a made-up word whose last letter is cut for the thing's class, as tunix-rt
        # cuts it from "fish" ("which is a fis"): an "s" only half the time, so the model compares
        # with the class minus its last letter, not minus an "s".
        cls, wider = _word(rng) + ("s" if rng.random() < 0.5 else rng.choice(LETTERS)), rng.choice(KINDS)[1]
        other = _word(rng)
        other = other if other != cls[:-1] else other + "x"
    c, answer = (cls[:-1], "Yes") if rng.random() < 0.5 else (other, "No")
    # The thing's own name does not decide, so it is any word: with members of the classes as
    # things ("goldfish", "poodle"), models said "fis fis: different" for a goldfish, "same" for "zzz".
    x = _word(rng)
    # both names first, then the verdict: the model compares two words it has just written
    steps = [f"{c} {cls[:-1]}: {'same' if answer == 'Yes' else 'different'}"]
    prompt = rng.choice(LOGIC_PROMPTS).format(cls=cls, wider=wider, x=x, c=c, w=wider[:-1])
    return prompt, steps, answer


WORDS = ("apple", "banana", "cherry", "date", "elderberry", "fig", "grape", "lemon", "mango", "melon", "orange", "peach",
         "pear", "plum", "kiwi", "lime", "berry", "olive", "hello", "world", "python", "model", "reason", "trace",
         "train", "tunix", "water", "stone", "river", "cloud", "light", "music", "table", "chair", "house", "green",
         "yellow", "purple", "silver", "garden", "bridge", "candle", "dragon", "forest", "island", "jungle",
         "kitten", "ladder", "monkey", "number", "pencil", "rabbit", "rocket", "sun", "cat", "dog", "tree", "book")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(rng) -> str:
    """A list word or a random letter string (3-10 letters), so spelling is learned for any word."""
    if rng.random() < 0.5:
        return rng.choice(WORDS)
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 10)))


def _indexed(letters) -> str:
    """(number, letter) pairs as "1r 2e 3a": copying by place number, where copying letter after
    letter (what follows the last one copied) goes wrong on repeated letters ("cherry")."""
    return " ".join(f"{i}{ch}" for i, ch in letters)


REVERSE_PROMPTS = ("Reverse the string: '{w}'", "Reverse the string: '{w}'", "Reverse the word '{w}'.",
                   "Write '{w}' backwards.", "Reverse this string: '{w}'")


def _string_reverse(rng):
    w = _word(rng)
    spelled = list(enumerate(w, start=1))
    steps = [_indexed(spelled), _indexed(spelled[::-1])]
    return rng.choice(REVERSE_PROMPTS).format(w=w), steps, w[::-1]


SORT_PROMPTS = ("Sort these characters alphabetically: {s}", "Sort these characters alphabetically: {s}",
                "Sort the letters {s} in alphabetical order.", "Arrange these letters alphabetically: {s}")


def alphabet_scan(s: str) -> str:
    """Sorting as a walk through the alphabet: every letter is written, followed by "-" when ``s``
    does not hold it, or by a running number once per time it does ("A- B- C1 D- E2 E3 ...").
    Each entry is one lookup (is this letter in the prompt, and once more?), where choosing the
    smallest remaining letter in one step was never learned (0.04 on tunix-rt's 27 items)."""
    out, k = [], 0
    for letter in LETTERS.upper():
        times = s.count(letter)
        if not times:
            out.append(f"{letter}-")
        for _ in range(times):
            k += 1
            out.append(f"{letter}{k}")
    return " ".join(out)


def _string_sort(rng):
    s = "".join(rng.choice(LETTERS.upper()) for _ in range(rng.randint(3, 9)))
    ordered = sorted(s)
    # the scan, then the letters it found by their running numbers (copied by number, as reversal)
    steps = [alphabet_scan(s), _indexed(enumerate(ordered, start=1))]
    return rng.choice(SORT_PROMPTS).format(s=s), steps, "".join(ordered)


REPEAT_PROMPTS = ("Repeat '{w}' {k} times", "Repeat '{w}' {k} times", "Say '{w}' {k} times.",
                  "Write the word '{w}' {k} times", "Repeat the word '{w}' {k} times.")


def _text_repeat(rng):
    w, k = _word(rng), rng.randint(1, 6)
    steps = [_indexed(enumerate(w, start=1)), " ".join(f"{i}:{w}" for i in range(1, k + 1))]
    return rng.choice(REPEAT_PROMPTS).format(w=w, k=k), steps, " ".join([w] * k)


UPPER_PROMPTS = ("Convert '{w}' to uppercase", "Convert '{w}' to uppercase", "Write '{w}' in capital letters.",
                 "Make '{w}' uppercase", "Convert '{w}' to upper case.")


def _uppercase(rng):
    w = _word(rng)
    steps = [" ".join(f"{i}{ch}:{ch.upper()}" for i, ch in enumerate(w, start=1))]  # numbered, as reversal
    return rng.choice(UPPER_PROMPTS).format(w=w), steps, w.upper()


FILLER = ("the", "a", "is", "red", "and", "also", "green", "big", "small", "on", "in", "my", "was", "very", "sweet",
          "old", "new", "near", "with", "blue", "fresh", "ripe", "one", "this", "that", "under", "table", "tree")
SENTENCES = ("The {w} is red and the {w} is also green", "I ate a {w} and then another {w}",
             "The {w} is on the table", "No {w} here")
COUNT_PROMPTS = ('How many times does \'{w}\' appear in: "{s}"', 'How many times does \'{w}\' appear in: "{s}"',
                 'Count how many times \'{w}\' appears in: "{s}"', 'How often does the word \'{w}\' occur in: "{s}"')


def _word_count(rng):
    w = rng.choice(WORDS)
    if rng.random() < 0.3:
        s = rng.choice(SENTENCES).format(w=w)
    else:
        others = [f for f in FILLER if f != w]
        words = [rng.choice(others) for _ in range(rng.randint(3, 7))]
        for _ in range(rng.choice((0, 1, 1, 2, 2, 2, 3, 4))):
            words.insert(rng.randint(0, len(words)), w)
        words[0] = words[0].capitalize() if words[0] != w else w
        s = " ".join(words)
    count, marks = 0, []
    for token in s.split():
        count += token == w
        marks.append(f"{token}:{count}")
    steps = [" ".join(marks)]
    return rng.choice(COUNT_PROMPTS).format(w=w, s=s), steps, str(count)


# family name -> maker; the names are the ones data.family() gives tunix-rt's own items
REASONING_FAMILIES = {
    "distance": _distance,
    "percent": _percent,
    "unit_cost": _unit_cost,
    "add_steps": _add_steps,
    "subtract_steps": _subtract_steps,
    "multiply_steps": _multiply_steps,
    "arithmetic": _arithmetic,
    "logic": _logic,
    "string_reverse": _string_reverse,
    "string_sort": _string_sort,
    "text_repeat": _text_repeat,
    "uppercase": _uppercase,
    "word_count": _word_count,
}


def _family_weights(families) -> dict[str, float]:
    """``families``: None (all, equally), a list of names, or {name: weight}."""
    if families is None:
        return {name: 1.0 for name in REASONING_FAMILIES}
    if isinstance(families, (list, tuple)):
        families = {name: 1.0 for name in families}
    if not isinstance(families, dict) or not families:
        raise ConfigError(f"generator 'reasoning': families must be a list of names or {{name: weight}}, got {families!r}")
    for name, weight in families.items():
        if name not in REASONING_FAMILIES:
            raise ConfigError(f"generator 'reasoning': unknown family {name!r} "
                              f"(allowed: {', '.join(REASONING_FAMILIES)})")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"generator 'reasoning': families.{name} must be a weight > 0, got {weight!r}")
    return dict(families)


def reasoning(n: int = 1000, seed: int = 0, *, families=None) -> list[dict]:
    """The families of tunix-rt's dev-reasoning-v2 (all but its 20 fixed edge cases), mixed by
    ``families`` weight (default: all, equally), each with its digit/letter scratchpad and answers
    formatted as tunix-rt's. Category = the family name. Prompts are unique within a set."""
    n = _check_n("reasoning", n)
    weights = _family_weights(families)
    names, w = list(weights), list(weights.values())
    rng = random.Random(seed)
    records, seen = [], set()
    for _ in range(50 * n + 1000):
        if len(records) == n:
            break
        family = rng.choices(names, w)[0]
        prompt, steps, answer = REASONING_FAMILIES[family](rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        records.append(_trace("reasoning", seed, len(records), family, prompt, steps, answer))
    if len(records) < n:
        raise ConfigError(f"generator 'reasoning': found only {len(records)} distinct prompts for n={n}; lower n")
    return records


GENERATORS: dict[str, Callable[..., list[dict]]] = {
    "addition": addition,
    "golden-v2": golden_v2,
    "high-card": high_card,
    "reasoning": reasoning,
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
