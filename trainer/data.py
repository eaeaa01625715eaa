"""Training data: JSONL files of `{"prompt": …, "completion": …}` records, read strictly.

A bad file is refused with its name, the line and the problem (`InvalidArgument`), never half-read.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

from quiver.errors import InvalidArgument


@dataclass(frozen=True)
class Example:
    prompt: str  # what the user sends (the chat template, if any, is applied when encoding)
    completion: str  # the answer the model must learn; the loss covers it (and end-of-sequence) only


def read_jsonl(path: Path) -> list[Example]:
    """Every non-blank line of `path` must be a JSON object with non-empty string fields prompt and completion."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as e:
        raise InvalidArgument(f"{path}: no such file") from e
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{path}: not UTF-8 text ({e})") from e
    examples = [_parse(path, number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not examples:
        raise InvalidArgument(f"{path}: no examples (expected one JSON object per line)")
    return examples


def write_jsonl(path: Path, examples: list[Example]) -> None:
    lines = (json.dumps({"prompt": e.prompt, "completion": e.completion}, ensure_ascii=False) for e in examples)
    Path(path).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def split(examples: list[Example], *, heldout_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random (train, held-out) split; each side keeps at least one example."""
    if len(examples) < 2:
        raise InvalidArgument(f"cannot hold out examples from a data set of {len(examples)}; pass held-out data")
    shuffled = random.Random(seed).sample(examples, len(examples))
    n = min(max(1, round(len(examples) * heldout_fraction)), len(examples) - 1)
    return shuffled[n:], shuffled[:n]


def _parse(path: Path, number: int, line: str) -> Example:
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict):
        raise InvalidArgument(f"{where}: expected a JSON object with prompt and completion, got {type(record).__name__}")
    extra = sorted(set(record) - {"prompt", "completion"})
    if extra:
        raise InvalidArgument(f"{where}: unknown field(s) {', '.join(extra)}; a record has prompt and completion only")
    for field in ("prompt", "completion"):
        value = record.get(field)
        if value is None:
            raise InvalidArgument(f"{where}: missing field {field!r}")
        if not isinstance(value, str):
            raise InvalidArgument(f"{where}: {field} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise InvalidArgument(f"{where}: {field} is empty")
    return Example(prompt=record["prompt"], completion=record["completion"])
