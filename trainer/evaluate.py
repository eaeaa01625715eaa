"""Score greedy answers generated through the serving engine, so that a trained adapter's held-out number is
what the server will answer. Several adapters (and the bare base model) are evaluated in one mixed batch."""

import re
from dataclasses import dataclass
from pathlib import Path

from quiver.adapters.formats import load_adapter
from quiver.adapters.weights import BottleneckWeights, LoraWeights
from quiver.config import EngineConfig, ModelConfig
from quiver.engine.engine import Engine
from quiver.engine.request import SamplingParams
from quiver.engine.service import EngineService
from quiver.model.loader import load_model
from quiver.trainer.data import Example
from quiver.trainer.encode import encode_prompt


@dataclass(frozen=True)
class Evaluation:
    metric: str  # "accuracy" (label words) or "exact_match"
    score: float  # fraction correct
    answers: list[str]  # the decoded greedy answers, in the order of the examples
    correct: list[bool]

    @property
    def num_examples(self) -> int:
        return len(self.answers)


def evaluate_served(
    *, model_path: Path, adapters: dict[str, Path | None], examples: list[Example], labels: tuple[str, ...] | None,
    max_new_tokens: int, device: str = "auto", dtype: str = "auto",
) -> dict[str, Evaluation]:
    """Greedy answers of every run in `adapters` (name -> adapter directory, or None for the base model alone),
    all in one batch through an `EngineService` over the model at `model_path`."""
    base = load_model(ModelConfig(path=str(model_path), device=device, dtype=dtype))
    module_names = {name for name, _ in base.model.named_modules()}
    weights = {name: load_adapter(path, base.model.config, module_names=module_names) for name, path in adapters.items() if path}
    engine = Engine(base, _engine_config(list(weights.values())))
    for name, w in weights.items():
        engine.register_adapter(name, w, source=adapters[name])
    prompts = [encode_prompt(base.tokenizer, e.prompt) for e in examples]
    runs = list(adapters)
    service = EngineService(engine)
    try:
        completions = service.generate(
            prompts * len(runs), SamplingParams(max_new_tokens=max_new_tokens),
            adapter_ids=[run if adapters[run] else None for run in runs for _ in prompts],
        )
    finally:
        service.shutdown()
    results = {}
    for i, run in enumerate(runs):
        mine = completions[i * len(prompts) : (i + 1) * len(prompts)]
        answers = [base.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in mine]
        results[run] = score(answers, examples, labels=labels)
    return results


def score(answers: list[str], examples: list[Example], *, labels: tuple[str, ...] | None) -> Evaluation:
    correct = [_is_correct(a, e.completion, labels) for a, e in zip(answers, examples, strict=True)]
    return Evaluation(
        metric="accuracy" if labels else "exact_match", score=sum(correct) / len(correct), answers=answers, correct=correct
    )


def label_of(answer: str, labels: tuple[str, ...]) -> str | None:
    """The label word that occurs first in `answer` (as a whole word, any case), or None."""
    hits = [(m.start(), label) for label in labels for m in [re.search(rf"\b{re.escape(label)}\b", answer, re.IGNORECASE)] if m]
    return min(hits)[1] if hits else None


def _is_correct(answer: str, expected: str, labels: tuple[str, ...] | None) -> bool:
    if labels:
        return (label_of(answer, labels) or "").casefold() == expected.strip().casefold()
    return _normalize(answer) == _normalize(expected)


def _normalize(text: str) -> str:
    return " ".join(text.casefold().split()).strip(" .!?,;:'\"")


def _engine_config(weights: list) -> EngineConfig:
    """Room for every LoRA/bottleneck adapter on the device at once, at its rank/size."""
    ranks = [w.max_rank for w in weights if isinstance(w, LoraWeights)]
    sizes = [w.bottleneck_size for w in weights if isinstance(w, BottleneckWeights)]
    return EngineConfig(
        adapter_slots=max(1, len(ranks) + len(sizes)), max_lora_rank=max(ranks, default=1),
        max_bottleneck_size=max(sizes, default=1),
    )
