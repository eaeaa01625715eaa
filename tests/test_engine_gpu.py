"""The engine on CUDA with the Triton kernels compiled for real (skipped without a GPU)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from quiver.config import EngineConfig
from quiver.engine.engine import Engine
from quiver.engine.request import SamplingParams
from quiver.model.loader import LoadedModel
from tests.support.adapter_zoo import ALL, greedy_reference, reference_model, save_zoo
from tests.support.models import run_staggered, run_together, save_tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cuda_engine(path, **config) -> Engine:
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").cuda().eval()
    loaded = LoadedModel(model=model, tokenizer=None, path=path, device=torch.device("cuda"), dtype=torch.float32)
    return Engine(loaded, EngineConfig(kernel_backend="triton", **config))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_matches_eager_on_cuda(kind, tmp_path):
    path = save_tiny(kind, tmp_path)
    engine = _cuda_engine(path, num_kv_blocks=64, block_size=16, max_num_batched_tokens=64)
    assert engine.runner.ops.name == "triton"
    ref = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").cuda().eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 160, (n,), generator=g).tolist() for n in (1, 7, 33, 90, 15, 64)]
    tokens = run_staggered(engine, prompts, SamplingParams(max_new_tokens=12, ignore_eos=True), [0, 0, 1, 3, 5, 8])
    for i, prompt in enumerate(prompts):
        out = ref.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert tokens[str(i)] == out[0, len(prompt):].tolist()
    assert engine.blocks.num_used == 0


def test_all_six_kinds_on_cuda(tmp_path):
    path = save_tiny("llama", tmp_path)
    dirs = save_zoo(path, tmp_path / "adapters")
    engine = _cuda_engine(path, num_kv_blocks=64, block_size=4, max_num_batched_tokens=32, adapter_slots=4,
                          max_lora_rank=8, max_bottleneck_size=8)
    for name, d in dirs.items():
        engine.register_adapter(name, engine.read_adapter(d), source=d)
    prompts = [[5 + i, 9, 11, 3 + i, 40] for i in range(len(ALL))]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    for i, name in enumerate(ALL):
        engine.add_request(str(i), prompts[i], params, adapter_id=name)
    tokens: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    for i, name in enumerate(ALL):
        assert tokens[str(i)] == greedy_reference(reference_model(path, name, dirs[name]), prompts[i], 4)[0], name


def _zoo_engine(path, dirs, **config) -> Engine:
    engine = _cuda_engine(path, num_kv_blocks=128, block_size=4, max_num_batched_tokens=64, adapter_slots=4,
                          max_lora_rank=8, max_bottleneck_size=8, **config)
    for name, d in dirs.items():
        engine.register_adapter(name, engine.read_adapter(d), source=d)
    return engine


def _decode(engine: Engine, names: list[str | None], steps: int, first: int = 0) -> dict[str, list[int]]:
    requests = [(str(first + i), [5 + i, 9, 11, 3 + i, 40], name) for i, name in enumerate(names)]
    return run_together(engine, requests, SamplingParams(max_new_tokens=steps, ignore_eos=True))


def test_cuda_graph_decode_gives_the_tokens_of_eager_decode_for_every_kind(tmp_path):
    """All six kinds and the base model in one batch (9 sequences: bucket 16, padded), graphs against
    --enforce-eager, and both against the references."""
    path = save_tiny("llama", tmp_path)
    dirs = save_zoo(path, tmp_path / "adapters")
    names = [*ALL, None, None]
    graphs = _zoo_engine(path, dirs)
    assert graphs.runner.graphs is not None and graphs.runner.pad_decode
    with_graphs = _decode(graphs, names, steps=6)
    assert graphs.runner.graphs.enabled and len(graphs.runner.graphs) >= 1
    eager = _zoo_engine(path, dirs, enforce_eager=True)
    assert eager.runner.graphs is None
    assert with_graphs == _decode(eager, names, steps=6)
    for i, name in enumerate(names):
        if name is not None:
            assert with_graphs[str(i)] == greedy_reference(reference_model(path, name, dirs[name]), [5 + i, 9, 11, 3 + i, 40], 6)[0], name


def test_changing_the_adapter_mix_between_replays_changes_the_outputs(tmp_path):
    """The same graph (same bucket, same adapter layout) replayed for different mixes: each mix's tokens are
    those of eager decode for that mix, so the adapter metadata the graph reads do change between replays."""
    path = save_tiny("llama", tmp_path)
    dirs = save_zoo(path, tmp_path / "adapters")
    l0, l1 = [n for n in ALL if n.startswith("lora")][:2]
    mixes = [[l0, l1, None], [l0, l0, l0], [None, None, l1]]  # the first places both adapters: one layout after
    graphs = _zoo_engine(path, dirs)
    eager = _zoo_engine(path, dirs, enforce_eager=True)
    outputs, captured = [], []
    for k, mix in enumerate(mixes):
        got = _decode(graphs, mix, steps=5, first=10 * k)
        assert got == _decode(eager, mix, steps=5, first=10 * k), mix
        outputs.append([got[str(10 * k + i)] for i in range(3)])
        captured.append(graphs.runner.graphs.captures)
    assert graphs.runner.graphs.enabled and captured[0] == captured[1] == captured[2]  # replayed, not recaptured
    assert outputs[1][0] != outputs[2][0] and outputs[1][2] != outputs[2][2]  # the same prompts, other adapters
