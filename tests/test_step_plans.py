"""The runner keeps a step's adapter plans for the next step with the same segments (decode steps of the same
requests), and plans afresh when the segments change or an adapter is written or cleared."""

from quiver.engine import runner as runner_module
from quiver.engine.request import SamplingParams
from tests.support.adapter_zoo import save_zoo
from tests.support.models import engine_for, save_tiny


def test_decode_steps_reuse_the_plans_until_the_segments_or_the_adapters_change(tmp_path, monkeypatch):
    model_path = save_tiny("llama", tmp_path)
    engine = engine_for(model_path, num_kv_blocks=64, block_size=4, max_num_batched_tokens=64, adapter_slots=2,
                        max_lora_rank=8, max_bottleneck_size=8)
    zoo = save_zoo(model_path, tmp_path / "adapters")
    for name in ("lora", "lora-all-r4", "bottleneck"):
        engine.register_adapter(name, engine.read_adapter(zoo[name]), source=zoo[name])
    planned = []
    plan_layers = runner_module.plan_layers
    monkeypatch.setattr(runner_module, "plan_layers", lambda *a, **k: planned.append(1) or plan_layers(*a, **k))
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    engine.add_request("a", [5, 6, 7], params, adapter_id="lora")
    engine.add_request("b", [8, 9, 10], params, adapter_id="lora-all-r4")
    engine.step()  # both prompts
    engine.step()  # the first decode step: new segments
    before = len(planned)
    plans = engine.runner._plans
    for _ in range(3):
        engine.step()
    assert len(planned) == before and engine.runner._plans is plans  # the same segments: the same plans

    engine.abort("b")
    engine.step()  # a's row alone: other segments
    assert len(planned) == before + 1
    engine.step()
    assert len(planned) == before + 1

    engine.add_request("c", [11, 12, 13], params, adapter_id="bottleneck")  # written into b's idle slot
    engine.step()
    assert engine.runner._plans is not plans and len(planned) == before + 2
    engine.runner.clear_adapter(0)  # a write or a clear: the kept plans go
    assert engine.runner._plans is None
