"""Scheduling only reserves; the runner writes. Placing an adapter reserves a slot or KV blocks and queues the
write; every weight write, slot clear, prefix write and prompt-adapter prefill happens inside the runner's
`execute`, before that step's forward, never while scheduling. And server/adapters stands beside the engine:
it imports nothing from it."""

import ast
import itertools
from pathlib import Path

from quiver.engine.request import SamplingParams
from quiver.errors import FailedPrecondition
from tests.support.models import engine_for

WRITES = ("write_adapter", "clear_adapter", "write_prefix", "prefill_embeddings")
ADAPTERS = Path(__file__).resolve().parents[1] / "server" / "adapters"


def _record(events: list, obj, name: str, monkeypatch) -> None:
    """Wrap obj.name so that its calls are recorded as ("begin", name) ... ("end", name)."""
    original = getattr(obj, name)

    def wrapped(*args, **kwargs):
        events.append(("begin", name))
        try:
            return original(*args, **kwargs)
        finally:
            events.append(("end", name))

    monkeypatch.setattr(obj, name, wrapped)


def test_every_adapter_write_happens_in_execute_before_the_steps_forward(model_path, zoo, monkeypatch):
    """One slot for two weight adapters (so they evict each other and are written again), a prefix and a prompt
    adapter: the order of calls shows each write inside `execute`, before its forward (the embedding of the
    step's token ids; a prompt adapter's prefill runs on embeddings), and none inside `schedule`."""
    engine = engine_for(model_path, num_kv_blocks=64, block_size=8, adapter_slots=1, max_lora_rank=8,
                        max_bottleneck_size=8)
    for name in ("lora", "bottleneck", "prefix", "prompt"):
        engine.register_adapter(name, engine.read_adapter(zoo[name]), source=zoo[name])
    events: list[tuple[str, ...]] = []
    for name in WRITES + ("execute",):
        _record(events, engine.runner, name, monkeypatch)
    _record(events, engine.scheduler, "schedule", monkeypatch)
    engine.runner.model.get_input_embeddings().register_forward_hook(lambda *_: events.append(("forward",)))
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    outputs, ids = [], itertools.count()
    for round_ in (["lora", "bottleneck", None, "prefix", "prompt"], ["lora", "bottleneck"]):
        for adapter_id in round_:
            n = next(ids)
            engine.add_request(str(n), [5 + n, 9, 14], params, adapter_id=adapter_id)
        while engine.has_work():
            outputs += engine.step()
    assert [o.error for o in outputs] == [None] * len(outputs) and sum(o.finished for o in outputs) == 7

    inside: set[str] = set()  # the recorded calls open now
    forwarded = False  # whether the open execute ran its forward yet
    written = []
    for event in events:
        if event == ("forward",):
            assert "execute" in inside and not inside & set(WRITES)
            forwarded = True
        elif event[0] == "begin":
            if event[1] in WRITES:
                assert "execute" in inside and not forwarded, f"{event[1]} outside execute or after its forward"
                assert "schedule" not in inside
                written.append(event[1])
            forwarded = forwarded and event[1] != "execute"
            inside.add(event[1])
        else:
            inside.discard(event[1])
    # lora, bottleneck, lora again, bottleneck again (each write clears its slot first), the prefix, the prompt
    assert written.count("write_adapter") == 4 and written.count("write_prefix") == written.count("prefill_embeddings") == 1


def test_the_adapters_package_imports_nothing_from_the_engine():
    importers = []
    for path in sorted(ADAPTERS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            relative = isinstance(node, ast.ImportFrom) and node.level > 0 and (node.module or "").startswith("engine")
            if relative or any(n == "quiver.engine" or n.startswith("quiver.engine.") for n in names):
                importers.append(f"{path.name}:{node.lineno}")
    assert len(list(ADAPTERS.glob("*.py"))) > 5 and importers == []


def test_a_weight_write_that_fails_ends_only_its_requests_and_gives_the_slot_back(model_path, zoo, monkeypatch):
    """The runner's write of one LoRA raises: its two requests end with that error, the base-model and other
    LoRA requests of the same step get their tokens as if it had never come, and its slot is free again (the
    next request for it is written afresh and served)."""
    def engine():
        engine = engine_for(model_path, num_kv_blocks=64, block_size=8, adapter_slots=2, max_lora_rank=8)
        for name in ("lora", "lora-all-r4"):
            engine.register_adapter(name, engine.read_adapter(zoo[name]), source=zoo[name])
        return engine

    def run(engine, requests):
        tokens, errors = {}, {}
        for i, (prompt, adapter_id) in enumerate(requests):
            engine.add_request(str(i), prompt, SamplingParams(max_new_tokens=4, ignore_eos=True), adapter_id=adapter_id)
        while engine.has_work():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                errors[out.request_id] = out.error
        return [tokens.get(str(i), []) for i in range(len(requests))], [errors[str(i)] for i in range(len(requests))]

    victims = [([5, 9, 14, 3], None), ([7, 8, 9], "lora")]
    want, _ = run(engine(), victims)
    failing = engine()
    write = failing.runner.write_adapter

    def broken(slot, weights):
        if weights is failing.adapters.current["lora-all-r4"].weights:
            raise FailedPrecondition("the slot write failed")
        write(slot, weights)

    monkeypatch.setattr(failing.runner, "write_adapter", broken)
    bad = ([20, 21, 22], "lora-all-r4")
    tokens, errors = run(failing, [bad, *victims, bad])
    assert tokens[1:3] == want and errors[1:3] == [None, None]
    assert tokens[0] == tokens[3] == [] and [str(e) for e in (errors[0], errors[3])] == ["the slot write failed"] * 2
    version = failing.adapters.current["lora-all-r4"]
    assert version.ref is None and version.placements == version.pins == 0 and len(failing.adapters._free_slots) == 1
    monkeypatch.undo()
    assert run(failing, [bad])[1] == [None]
