"""All six adapter kinds served in one mixed batch, each request checked against its reference run alone."""

import pytest
import torch

from quiver.engine.request import SamplingParams
from tests.support.adapter_zoo import ALL, greedy_reference, reference_model, save_zoo
from tests.support.models import RecordingSampler, eager, engine_for, save_tiny, without_cpu_fast_paths

NEW_TOKENS = 6


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model_path = save_tiny(request.param, root)
    return model_path, save_zoo(model_path, root / "adapters")


def _engine(model_path, dirs, **config):
    engine = engine_for(model_path, num_kv_blocks=128, block_size=4, max_num_batched_tokens=24,
                        adapter_slots=4, max_lora_rank=8, max_bottleneck_size=8, **config)
    for name, path in dirs.items():
        engine.register_adapter(name, engine.read_adapter(path), source=path)
    return engine


@pytest.mark.parametrize("c_kernels", [True, False], ids=["c-kernels", "pure-torch"])
def test_mixed_batch_of_all_kinds_matches_each_reference_alone(setup, c_kernels, monkeypatch):
    """With the CPU's fast paths (the C kernels of quiver.kernels.native, oneDNN's packed linears) and without
    them, as on a machine without a compiler."""
    if not c_kernels:
        without_cpu_fast_paths(monkeypatch)
    model_path, dirs = setup
    engine = _engine(model_path, dirs)
    recorder = RecordingSampler()
    engine.runner.sampler = recorder
    g = torch.Generator().manual_seed(3)
    names = [*ALL, None, "lora", "prompt"]  # base rows, and two adapters used twice
    prompts = [torch.randint(3, 160, (int(n),), generator=g).tolist() for n in torch.randint(1, 14, (len(names),), generator=g)]
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    tokens = {str(i): [] for i in range(len(names))}
    arrive = [0, 0, 1, 1, 2, 3, 3, 4, 5, 6]
    step = 0
    while step <= max(arrive) or engine.has_work():
        for i, at in enumerate(arrive):
            if at == step:
                engine.add_request(str(i), prompts[i], params, adapter_id=names[i])
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        step += 1
    base = eager(model_path)
    for i, name in enumerate(names):
        ref = reference_model(model_path, name, dirs[name]) if name else base
        want_tokens, want_logits = greedy_reference(ref, prompts[i], NEW_TOKENS)
        if name:  # the adapter really changes the model, so the comparison can fail
            assert (want_logits[0] - greedy_reference(base, prompts[i], 1)[1][0]).abs().max() > 0.1, name
        assert tokens[str(i)] == want_tokens, name
        torch.testing.assert_close(torch.stack(recorder.logits[str(i)]), want_logits, rtol=0, atol=1e-4, msg=name)
    assert engine.blocks.num_used == sum(len(v.blocks) for v in engine.adapters.current.values())


def test_triton_backend_serves_every_kind(setup):
    """The same mixed batch through the Triton kernels (under the interpreter here): proves the wiring."""
    model_path, dirs = setup
    engine = _engine(model_path, dirs, kernel_backend="triton")
    names = [*ALL, None]
    prompts = [[5 + i, 9, 11, 3 + i] for i in range(len(names))]
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    for i, name in enumerate(names):
        engine.add_request(str(i), prompts[i], params, adapter_id=name)
    tokens: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    for i, name in enumerate(names):
        ref = reference_model(model_path, name, dirs[name]) if name else eager(model_path)
        assert tokens[str(i)] == greedy_reference(ref, prompts[i], 2)[0], name


def test_lora_rows_match_peft_mixed_adapter_batch(setup):
    """PEFT's own mixed-LoRA batch (`adapter_names=`), one forward per step over all rows, as the reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_path, dirs = setup
    base = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="eager").eval()
    peft_model = PeftModel.from_pretrained(base, dirs["lora"], adapter_name="lora").eval()
    peft_model.load_adapter(dirs["lora-all-r4"], adapter_name="lora-all-r4")
    names = ["lora", "lora-all-r4", "__base__", "lora"]
    prompts = [[7, 8, 9, 10, 11], [20, 21, 22, 23, 24], [30, 31, 32, 33, 34], [40, 41, 42, 43, 44]]
    ids = torch.tensor(prompts)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = peft_model(input_ids=ids, adapter_names=names).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    engine = _engine(model_path, dirs)
    for i, (name, prompt) in enumerate(zip(names, prompts)):
        engine.add_request(str(i), prompt, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
                           adapter_id=None if name == "__base__" else name)
    tokens: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert [tokens[str(i)] for i in range(4)] == ids[:, 5:].tolist()
