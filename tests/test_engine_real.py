"""The engine on the real default model (SmolLM2-135M-Instruct) against transformers' eager generate()."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from quiver.config import EngineConfig, ModelConfig, default_cache_dir
from quiver.engine.engine import Engine
from quiver.engine.request import SamplingParams
from quiver.model.loader import load_model
from tests.support.models import run_staggered

pytestmark = pytest.mark.real_model

QUESTIONS = [
    "Hi!",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, for a child of six who keeps asking questions.",
    "List three fruits.",
    "Translate 'good morning' into Spanish, French and German, and say which one you find nicest.",
    "Here is a story: a fox found a box in the snow, opened it, and found a smaller box inside, and inside "
    "that one a note that said 'keep looking'. The fox kept looking all winter. What did it find in spring?",
    "2 + 2 = ?",
]


@pytest.fixture(scope="module")
def loaded():
    return load_model(ModelConfig(cache_dir=default_cache_dir()))


def _chat(tokenizer, text):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


@pytest.mark.parametrize("num_kv_blocks", [512, 12], ids=["roomy-pool", "tiny-pool-preempts"])
def test_greedy_tokens_equal_eager_generate_with_staggered_arrivals(loaded, num_kv_blocks):
    engine = Engine(loaded, EngineConfig(num_kv_blocks=num_kv_blocks, block_size=16, max_num_batched_tokens=64))
    prompts = [_chat(loaded.tokenizer, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)
    params = SamplingParams(max_new_tokens=24)
    tokens = run_staggered(engine, prompts, params, arrive_at=[0, 0, 1, 2, 4, 5, 7, 11])
    eager = AutoModelForCausalLM.from_pretrained(loaded.path, attn_implementation="eager").eval()
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            out = eager.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
        assert tokens[str(i)] == out[0, len(prompt):].tolist(), QUESTIONS[i]
    assert engine.blocks.num_used == 0
    if num_kv_blocks == 12:
        assert engine.scheduler.num_preemptions > 0
