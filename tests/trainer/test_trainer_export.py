"""Every method trained a few steps on a tiny model, exported, and read back: by PEFT (logits equal to the trainer's
model), by the server's format reader, and by the engine serving all adapters in one mixed batch (the same greedy
answers as the trainer's own model)."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from quiver.adapters.formats import load_adapter
from quiver.trainer.encode import collate, encode, encode_prompt
from quiver.trainer.evaluate import evaluate_served
from quiver.trainer.methods import MethodConfig, prepare
from quiver.trainer.pipeline import train_and_export
from quiver.trainer.train import TrainConfig
from tests.support.adapter_zoo import greedy_reference
from tests.trainer.trainer_fixtures import save_tiny_with_tokenizer, toy_examples

CONFIGS = {
    "lora": MethodConfig("lora", lora_rank=4, lora_targets=("q_proj", "v_proj", "o_proj", "down_proj"), rslora=True),
    "adapter": MethodConfig("adapter", bottleneck_size=8, non_linearity="silu"),
    "prefix": MethodConfig("prefix", num_virtual_tokens=4, prefix_hidden=16),
    "ptuning-v2": MethodConfig("ptuning-v2", num_virtual_tokens=5),
    "prompt": MethodConfig("prompt", num_virtual_tokens=6),
    "ptuning": MethodConfig("ptuning", num_virtual_tokens=4, encoder_hidden=16),
    "ptuning-lstm": MethodConfig("ptuning", num_virtual_tokens=3, encoder="lstm", encoder_hidden=16),
    "full": MethodConfig("full"),
}
PEFT_KINDS = ("lora", "prefix", "ptuning-v2", "prompt", "ptuning", "ptuning-lstm")
NEW_TOKENS = 7


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    model_path = save_tiny_with_tokenizer(root)
    runs = {}
    for name, method in CONFIGS.items():
        config = TrainConfig(steps=4, lr=1e-3 if name == "full" else 2e-2, batch_size=4, seed=1)
        runs[name] = train_and_export(
            model_path=model_path, method=method, config=config, examples=toy_examples(24), max_length=64,
            out=root / name, progress=False,
        )
    return model_path, runs


def _batch(model_path):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    batch = collate([encode(tokenizer, e, max_length=64) for e in toy_examples(30)[-3:]], pad_id=tokenizer.eos_token_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@pytest.mark.parametrize("name", PEFT_KINDS)
def test_peft_loads_the_export_with_the_trainers_logits(trained, name):
    model_path, runs = trained
    batch = _batch(model_path)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), runs[name].out).eval()
    base = AutoModelForCausalLM.from_pretrained(model_path).eval()
    with torch.no_grad():
        ours = runs[name].trainable.model(**batch).logits
        theirs = reloaded(**batch).logits
        untouched = base(**batch).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    n = ours.shape[1] - untouched.shape[1]  # virtual tokens of the prompt kinds
    assert (ours[:, n:] - untouched).abs().max() > 1e-3, "training left the model unchanged"


def test_bottleneck_starts_as_identity_and_exports_what_it_learned(trained):
    model_path, runs = trained
    batch = _batch(model_path)
    fresh = prepare(AutoModelForCausalLM.from_pretrained(model_path).eval(), CONFIGS["adapter"])
    base = AutoModelForCausalLM.from_pretrained(model_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(**batch).logits, base(**batch).logits, atol=0, rtol=0)
    learned = runs["adapter"].trainable.bottlenecks
    weights = load_adapter(runs["adapter"].out, base.config)
    assert weights.non_linearity == "silu" and weights.scaling == 1.0 and set(weights.sites) == set(learned.names)
    for name, adapter in zip(learned.names, learned.adapters):
        site = weights.sites[name]
        assert site.up.abs().max() > 0
        for saved, live in ((site.down, adapter.down.weight), (site.down_bias, adapter.down.bias),
                            (site.up, adapter.up.weight), (site.up_bias, adapter.up.bias)):
            assert torch.equal(saved, live.detach())


def test_engine_serving_the_exports_in_one_mixed_batch_gives_the_trainers_answers(trained):
    model_path, runs = trained
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    examples = toy_examples(30)[-4:]
    adapters = {name: runs[name].out for name in CONFIGS if name != "full"} | {"base": None}
    served = evaluate_served(model_path=model_path, adapters=adapters, examples=examples, labels=None, max_new_tokens=NEW_TOKENS)
    served |= evaluate_served(model_path=runs["full"].out, adapters={"full": None}, examples=examples, labels=None,
                              max_new_tokens=NEW_TOKENS)
    for name in CONFIGS:
        model = runs[name].trainable.model
        expected = [_answer(model, tokenizer, encode_prompt(tokenizer, e.prompt)) for e in examples]
        assert served[name].answers == expected, name
    assert len({tuple(served[name].answers) for name in [*CONFIGS, "base"]}) > 1


def _answer(model, tokenizer, prompt: list[int]) -> str:
    """The trainer's model, greedy with full forwards, up to and including end-of-sequence."""
    tokens, _ = greedy_reference(model, prompt, NEW_TOKENS)
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
    return tokenizer.decode(tokens, skip_special_tokens=True)
