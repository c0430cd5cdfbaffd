"""Reasoning-trace datasets: read, check, render, generate, split, fingerprint.

The first stage of the pipeline. A dataset is a list of :class:`Example`; each example holds the
raw question (``prompt``), the training target rendered as
``<reasoning>...</reasoning><answer>...</answer>`` (``completion``, None for eval items) and the
expected final ``answer``.

Three JSONL formats are read (the format is fixed by a file's first record):

* trace      ``{trace_version, prompt, steps: [{i, type, content}], final_answer, meta}`` (tunix-rt)
* completion ``{prompt, completion, id?, category?}``
* eval item  ``{id, prompt, expected_answer, category?, difficulty?, section?}`` (tunix-rt)

Anything wrong with a file raises :class:`~mlflow_tunix.errors.DataError` naming ``file:line``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from mlflow_tunix.errors import ConfigError, DataError

TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
TEMPLATES = {
    "plain": "{prompt}\n",
    "gemma": "<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n",
}
TEMPLATE_SPECIAL_TOKENS = ("<start_of_turn>", "<end_of_turn>")


@dataclass(frozen=True)
class Example:
    """One dataset item. ``completion`` is None for eval items (there is nothing to train on)."""

    id: str
    prompt: str  # the raw question; the chat template is applied later, by render_prompt
    completion: str | None  # "<reasoning>...</reasoning><answer>...</answer>"
    answer: str  # the expected final answer
    category: str | None = None
    # Provenance, left out of == and hash: the content fields above decide identity (as in
    # digest()), and a dict-valued field would make Examples unhashable.
    source: str = field(default="", compare=False)  # "train.jsonl:17" or "generator:addition#17"
    meta: Mapping = field(default_factory=dict, compare=False)  # tunix-rt meta, difficulty, section


# --------------------------------------------------------------------------------------------
# Rendering and parsing the <reasoning>/<answer> format


def render_completion(steps: Sequence[str], answer: str) -> str:
    """The training target: the steps one per line inside <reasoning>, then the <answer>."""
    return "<reasoning>" + "\n".join(steps) + "</reasoning><answer>" + answer + "</answer>"


def render_prompt(prompt: str, template: str = "plain") -> str:
    """The text the model sees before its completion."""
    if template not in TEMPLATES:
        raise ConfigError(f"unknown prompt template {template!r} (allowed: {', '.join(TEMPLATES)})")
    return TEMPLATES[template].format(prompt=prompt)


def _between(text: str, open_tag: str, close_tag: str) -> str | None:
    start = text.find(open_tag)
    if start < 0:
        return None
    start += len(open_tag)
    end = text.find(close_tag, start)
    if end < 0:
        return None  # an unclosed tag means the model stopped early: no answer
    return text[start:end].strip()


def parse_answer(text: str) -> str | None:
    """The stripped content of the first closed <answer>...</answer>, else None."""
    return _between(text, "<answer>", "</answer>")


def parse_reasoning(text: str) -> str | None:
    """The stripped content of the first closed <reasoning>...</reasoning>, else None."""
    return _between(text, "<reasoning>", "</reasoning>")


_WELL_FORMED = re.compile(r"\s*<reasoning>(.*)</reasoning><answer>(.*)</answer>\s*", re.DOTALL)


def is_well_formed(text: str) -> bool:
    """True if text is exactly one <reasoning>X</reasoning><answer>Y</answer> (Y not blank),
    with only whitespace around it."""
    m = _WELL_FORMED.fullmatch(text)
    if m is None:
        return False
    reasoning, answer = m.groups()
    # The greedy groups would swallow extra tags ("...</answer><answer>..."): forbid any inside.
    if any(tag in reasoning or tag in answer for tag in TAGS):
        return False
    return answer.strip() != ""


def answers_match(predicted: str | None, expected: str) -> bool:
    """tunix-rt's rule: equal after strip().lower(). No answer never matches."""
    if predicted is None:
        return False
    return predicted.strip().lower() == str(expected).strip().lower()


# --------------------------------------------------------------------------------------------
# Reading and checking records

FORMATS = ("trace", "completion", "eval")


def _type_name(value) -> str:
    return "null" if value is None else {dict: "object", list: "list", str: "string"}.get(
        type(value), type(value).__name__
    )


def _record_format(record: dict) -> str | None:
    """Which of the three formats a record is in, by the keys only that format has."""
    if "final_answer" in record or "steps" in record or "trace_version" in record:
        return "trace"
    if "expected_answer" in record:
        return "eval"
    if "completion" in record:
        return "completion"
    return None


class _Checker:
    """Field checks for one record; raises DataError naming the file and line."""

    def __init__(self, path, line: int):
        self.path, self.line = path, line

    def fail(self, message: str):
        raise DataError(self.path, self.line, message)

    def text(self, record: dict, key: str, *, label: str | None = None, nonblank=True) -> str:
        label = label or key
        if key not in record:
            self.fail(f"'{label}' is missing")
        value = record[key]
        if not isinstance(value, str):
            self.fail(f"'{label}' must be a string, got {_type_name(value)}")
        if nonblank and not value.strip():
            self.fail(f"'{label}' is empty")
        return value

    def answer(self, record: dict, key: str) -> str:
        """A final answer: a string, or a number (kept as its str()). Never blank."""
        if key not in record:
            self.fail(f"'{key}' is missing")
        value = record[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                self.fail(f"'{key}' must be a string or a number, got {value}")
            value = str(value)
        if not isinstance(value, str):
            self.fail(f"'{key}' must be a string or a number, got {_type_name(value)}")
        if not value.strip():
            self.fail(f"'{key}' is empty")
        for tag in TAGS:
            if tag in value:
                self.fail(f"'{key}' contains the tag {tag!r}")
        return value.strip()

    def optional_name(self, mapping: Mapping, key: str, label: str) -> str | None:
        """An optional id or category: a string or an integer (ids are often numbers)."""
        value = mapping.get(key)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            self.fail(f"'{label}' must be a string, got {_type_name(value)}")
        return value

    def steps(self, record: dict) -> list[str]:
        if "steps" not in record:
            self.fail("'steps' is missing")
        steps = record["steps"]
        if not isinstance(steps, list):
            self.fail(f"'steps' must be a list, got {_type_name(steps)}")
        keyed = []
        for k, step in enumerate(steps):
            if not isinstance(step, dict):
                self.fail(f"'steps[{k}]' must be an object, got {_type_name(step)}")
            content = self.text(step, "content", label=f"steps[{k}].content", nonblank=False)
            for tag in TAGS:
                if tag in content:
                    self.fail(f"'steps[{k}].content' contains the tag {tag!r}")
            i = step.get("i", k)  # tunix-rt numbers its steps; without "i" keep file order
            if not isinstance(i, int) or isinstance(i, bool):
                self.fail(f"'steps[{k}].i' must be an integer, got {_type_name(i)}")
            keyed.append((i, k, content))
        return [content for _, _, content in sorted(keyed)]


def _stem(source) -> str:
    name = Path(str(source)).name
    return name[: -len(".jsonl")] if name.endswith(".jsonl") else name


def _example(record, fmt: str, check: _Checker, fallback_id: str, where: str) -> Example:
    """Turn one checked record of format ``fmt`` into an Example."""
    prompt = check.text(record, "prompt")
    if fmt == "trace":
        steps = check.steps(record)
        answer = check.answer(record, "final_answer")
        meta = record.get("meta", {})
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            check.fail(f"'meta' must be an object, got {_type_name(meta)}")
        return Example(
            id=check.optional_name(meta, "id", "meta.id") or fallback_id,
            prompt=prompt,
            completion=render_completion(steps, answer),
            answer=answer,
            category=check.optional_name(meta, "category", "meta.category"),
            source=where,
            meta=dict(meta),
        )
    if fmt == "completion":
        completion = check.text(record, "completion")
        if "<answer>" in completion:
            answer = parse_answer(completion)
            if not answer:
                check.fail("'completion' has an <answer> tag but no closed, non-empty answer")
        else:  # a bare answer: give it the tags (with empty reasoning) so targets look alike
            answer = completion.strip()
            completion = render_completion([], answer)
        return Example(
            id=check.optional_name(record, "id", "id") or fallback_id,
            prompt=prompt,
            completion=completion,
            answer=answer,
            category=check.optional_name(record, "category", "category"),
            source=where,
        )
    # eval item
    answer = check.answer(record, "expected_answer")
    return Example(
        id=check.optional_name(record, "id", "id") or fallback_id,
        prompt=prompt,
        completion=None,
        answer=answer,
        category=check.optional_name(record, "category", "category"),
        source=where,
        meta={k: record[k] for k in ("difficulty", "section") if k in record},
    )


def _examples(numbered: Iterable[tuple[int, object]], path, sep: str) -> list[Example]:
    """Check numbered records (all in the first record's format, ids unique) into Examples."""
    stem = _stem(path)
    examples: list[Example] = []
    first: tuple[str, int] | None = None  # (format, line) of the first record
    seen: dict[str, int] = {}
    for line, record in numbered:
        check = _Checker(path, line)
        if not isinstance(record, dict):
            check.fail(f"record must be a JSON object, got {_type_name(record)}")
        fmt = _record_format(record)
        if fmt is None:
            check.fail(
                "cannot tell the record's format: expected a trace ('final_answer'), "
                "a 'completion' or an eval item ('expected_answer')"
            )
        if first is None:
            first = (fmt, line)
        elif fmt != first[0]:
            check.fail(f"record is in {fmt} format but the file is in {first[0]} format (line {first[1]})")
        ex = _example(record, fmt, check, f"{stem}-{line}", f"{path}{sep}{line}")
        if ex.id in seen:
            check.fail(f"duplicate id {ex.id!r} (also on line {seen[ex.id]})")
        seen[ex.id] = line
        examples.append(ex)
    if first is None:
        raise DataError(path, None, "no records (the file is empty)")
    return examples


def _numbered_records(path, data: bytes):
    """Yield (line number, parsed JSON) for each non-blank line of a JSONL file's bytes."""
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write
        data = data[3:]
    for line, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(path, line, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not text.strip():
            continue
        try:
            yield line, json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, line, f"invalid JSON: {e.msg} (column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # e.g. an integer too long, nesting too deep
            raise DataError(path, line, f"invalid JSON: {e}") from None


def read_jsonl(path) -> list[Example]:
    """Read and check a dataset file (trace, completion or eval-item JSONL)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, None, "is a directory, not a JSONL file") from None
    except OSError as e:
        raise DataError(path, None, f"cannot read the file ({e.strerror})") from None
    return _examples(_numbered_records(path, data), path, ":")


def examples_from_records(records: Iterable[dict], source: str) -> list[Example]:
    """Check in-memory records as read_jsonl checks a file's lines (records numbered from 1);
    each Example's source is ``f"{source}#{number}"``."""
    return _examples(enumerate(records, start=1), source, "#")


def write_jsonl(records: Iterable[dict], path) -> None:
    """Write records one JSON object per line (UTF-8, non-ASCII kept readable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# Looking at, splitting and fingerprinting a dataset


def summarize(examples: Sequence[Example]) -> dict:
    """Counts and sizes for a run's params / a dataset card.

    ``format`` is "train" (all items have a completion), "eval" (none has) or "mixed".
    Items without a category are counted under "uncategorized".
    """
    n = len(examples)
    completions = [ex.completion for ex in examples if ex.completion is not None]
    categories: dict[str, int] = {}
    for ex in examples:
        name = ex.category if ex.category is not None else "uncategorized"
        categories[name] = categories.get(name, 0) + 1
    if completions and len(completions) == n:
        fmt = "train"
    elif not completions:
        fmt = "eval"
    else:
        fmt = "mixed"
    return {
        "examples": n,
        "format": fmt,
        "with_completion": len(completions),
        "categories": dict(sorted(categories.items())),
        "mean_prompt_chars": round(sum(len(ex.prompt) for ex in examples) / n, 1) if n else 0.0,
        "mean_completion_chars": (
            round(sum(len(c) for c in completions) / len(completions), 1) if completions else 0.0
        ),
    }


def split(
    examples: Sequence[Example], eval_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """A seeded train/eval split; eval gets max(1, round(n * eval_fraction)) items.

    Both parts keep the input order, so the same (examples, fraction, seed) always gives the
    same two lists.
    """
    n = len(examples)
    if not 0 < eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    if n < 2:
        raise ConfigError(f"cannot split {n} example(s): need at least 2")
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))  # keep at least one to train on
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    evals = [ex for i, ex in enumerate(examples) if i in held]
    return train, evals


def digest(examples: Sequence[Example]) -> str:
    """sha256 (64 hex chars) of the content, in order: (id, prompt, completion, answer, category)."""
    rows = [[ex.id, ex.prompt, ex.completion, ex.answer, ex.category] for ex in examples]
    canonical = json.dumps(rows, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def drop_overlap(train: Sequence[Example], held_out: Sequence[Example]) -> tuple[list[Example], int]:
    """Remove train items whose prompt (stripped) is also a held-out prompt, so the eval set
    measures generalisation and not recall. Returns (kept, number dropped)."""
    held = {ex.prompt.strip() for ex in held_out}
    kept = [ex for ex in train if ex.prompt.strip() not in held]
    return kept, len(train) - len(kept)


MLFLOW_DIGEST_CHARS = 16  # MLflow stores dataset digests in a 36-char column


def to_mlflow_dataset(examples: Sequence[Example], name: str, source: str):
    """An ``mlflow.data.PandasDataset`` (columns id, prompt, completion, answer, category; target
    "answer") whose digest is the first 16 chars of :func:`digest`, ready for
    ``mlflow.log_input``. A path becomes a file source; anything MLflow cannot resolve (such as
    "generator:addition?n=1000&seed=0") is recorded as a code source naming it."""
    import warnings

    import mlflow.data
    import pandas as pd
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.exceptions import MlflowException

    df = pd.DataFrame(
        [[ex.id, ex.prompt, ex.completion, ex.answer, ex.category] for ex in examples],
        columns=["id", "prompt", "completion", "answer", "category"],
    )
    try:
        with warnings.catch_warnings():
            # A local path matches two equivalent resolvers; MLflow warns and picks one.
            warnings.simplefilter("ignore", UserWarning)
            resolved = resolve_dataset_source(str(source))
    except MlflowException:
        resolved = CodeDatasetSource(tags={"mlflow.source.name": str(source)})
    return mlflow.data.from_pandas(
        df, source=resolved, name=name, targets="answer", digest=digest(examples)[:MLFLOW_DIGEST_CHARS]
    )


# --------------------------------------------------------------------------------------------
# Synthetic datasets. Each generator returns trace-format records, a pure function of
# (n, seed, options), with meta {generator, seed, index, category, id}.


def _check_n(name: str, n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"generator {name!r}: n must be a positive integer, got {n!r}")
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
        and 1 <= digits[0] <= digits[1]
    )
    if not ok:
        raise ConfigError(
            f"generator 'addition': digits must be (min, max) operand lengths with 1 <= min <= max, got {digits!r}"
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


def golden_v2(n: int = 100, seed: int = 0) -> list[dict]:
    """tunix-rt's golden-v2 set: n//2 additions of 1..100, then n - n//2 "Repeat 'w' k times".

    The random calls are made in tunix-rt's order (tools/seed_dataset.py, generate_golden_v2), so
    seed=42 and n=100 give the same prompts, steps and answers as tunix-rt's set.
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


def generate(name: str, n: int | None = None, seed: int = 0, **options) -> list[dict]:
    """Records from a named generator; n=None takes the generator's default size."""
    if name not in GENERATORS:
        raise ConfigError(f"unknown generator {name!r} (allowed: {', '.join(GENERATORS)})")
    fn = GENERATORS[name]
    allowed = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    for key in options:
        if key not in allowed:
            raise ConfigError(
                f"unknown option {key!r} for generator {name!r} (allowed: {', '.join(allowed) or 'none'})"
            )
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"generator {name!r}: seed must be an integer, got {seed!r}")
    if n is None:
        return fn(seed=seed, **options)
    return fn(n, seed, **options)
