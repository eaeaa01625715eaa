"""Tiny random models and engines for tests (seconds each), the eager reference they are checked against, and a
sampler that keeps the logits the engine chose from."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from quiver.config import EngineConfig
from quiver.engine.engine import Engine
from quiver.engine.sampler import Sampler
from quiver.kernels import native, packed_linear
from quiver.model.loader import LoadedModel

_TINY = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    max_position_embeddings=512,
)


def save_tiny(kind: str, root: Path, seed: int = 0) -> Path:
    """Write a tiny random `llama` or `qwen2` model (GQA, fp32) to root/kind and return the folder."""
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_TINY))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**_TINY, use_sliding_window=False))
    path = root / kind
    model.save_pretrained(path)
    return path


def eager(path: Path) -> torch.nn.Module:
    """The reference: transformers' own eager attention."""
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def engine_for(path: Path, **engine_config) -> Engine:
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    model.requires_grad_(False)
    loaded = LoadedModel(model=model, tokenizer=None, path=path, device=torch.device("cpu"), dtype=torch.float32)
    return Engine(loaded, EngineConfig(**engine_config))


def run_staggered(engine: Engine, prompts: list[list[int]], params, arrive_at: list[int]) -> dict[str, list[int]]:
    """Add prompt i at engine step arrive_at[i]; step until all finish; tokens by request id (= str(i))."""
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    step = 0
    while step <= max(arrive_at) or engine.has_work():
        for i, at in enumerate(arrive_at):
            if at == step:
                engine.add_request(str(i), prompts[i], params)
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        step += 1
    return tokens


def run_together(engine: Engine, requests: list[tuple[str, list[int], str | None]], params) -> dict[str, list[int]]:
    """Add every (request id, prompt, adapter id) at once; step until all finish, none with an error; tokens by
    request id."""
    for request_id, prompt, adapter_id in requests:
        engine.add_request(request_id, prompt, params, adapter_id=adapter_id)
    tokens: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            assert out.error is None, out.error
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


class RecordingSampler(Sampler):
    """Greedy sampling that keeps every row of logits it was given, per request."""

    def __init__(self) -> None:
        super().__init__()
        self.logits: dict[str, list[torch.Tensor]] = {}  # request id -> one [V] row per sampled token

    def sample(self, logits, requests):
        for row, request in zip(logits, requests):
            self.logits.setdefault(request.request_id, []).append(row.clone())
        return super().sample(logits, requests)


def without_cpu_fast_paths(monkeypatch) -> None:
    """The pure-torch path, as with QUIVER_NATIVE_KERNELS=0 or on a machine without a C compiler or oneDNN: no C
    kernels (quiver.kernels.native) and no packed linears (quiver.kernels.packed_linear) for what is built after."""
    monkeypatch.setattr(native, "_loaded", {"lib": None})
    monkeypatch.setattr(packed_linear, "_checked", {"ok": False})
