"""Loading, replacing and unloading adapters while requests run; slots, host memory and KV blocks return to idle."""

import shutil

import pytest
import torch

from quiver.engine.request import SamplingParams
from quiver.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tests.support.adapter_zoo import greedy_reference, reference_model, save_zoo
from tests.support.models import eager, engine_for, save_tiny

NEW = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    model_path = save_tiny("llama", root)
    return model_path, save_zoo(model_path, root / "adapters")


def _engine(model_path, **config):
    return engine_for(model_path, num_kv_blocks=160, block_size=4, max_num_batched_tokens=32, adapter_slots=2,
                      max_lora_rank=8, max_bottleneck_size=8, **config)


def _load(engine, adapter_id, path, replace=False):
    return engine.register_adapter(adapter_id, engine.read_adapter(path), source=path, replace=replace)


def test_replace_unload_and_load_while_32_requests_run(setup):
    model_path, dirs = setup
    engine = _engine(model_path)
    _load(engine, "a", dirs["lora"])
    _load(engine, "p", dirs["prefix"])
    _load(engine, "b", dirs["bottleneck"])
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 160, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (40,), generator=g)]
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    expected_dir: dict[str, str] = {}  # request -> the adapter directory it must have been served with
    for i in range(32):
        adapter = ["a", "p", "b", None][i % 4]
        engine.add_request(str(i), prompts[i], params, adapter_id=adapter)
        expected_dir[str(i)] = {"a": "lora", "p": "prefix", "b": "bottleneck", None: None}[adapter]
    tokens: dict[str, list[int]] = {}

    def step():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)

    for _ in range(3):
        step()
    _load(engine, "a", dirs["lora-all-r4"], replace=True)  # running "a" requests keep the old weights
    engine.unregister_adapter("p")  # running "p" requests finish; new ones are refused
    _load(engine, "q", dirs["prompt"])
    with pytest.raises(NotFound):
        engine.add_request("late-p", prompts[32], params, adapter_id="p")
    for i in range(32, 40):
        adapter = ["a", "q"][i % 2]
        engine.add_request(str(i), prompts[i], params, adapter_id=adapter)
        expected_dir[str(i)] = {"a": "lora-all-r4", "q": "prompt"}[adapter]
    while engine.has_work():
        step()

    references = {}
    for rid, name in expected_dir.items():
        if name not in references:
            references[name] = reference_model(model_path, name, dirs[name]) if name else eager(model_path)
        want, _ = greedy_reference(references[name], prompts[int(rid)], NEW)
        assert tokens[rid] == want, (rid, name)

    for adapter_id in ("a", "b", "q"):
        engine.unregister_adapter(adapter_id)
    registry = engine.adapters
    assert engine.blocks.num_used == 0
    assert sorted(registry._free_slots) == [0, 1] and not registry._on_device
    assert registry.host_bytes == 0 and not registry.current


def test_refusals_leave_nothing_behind(setup):
    model_path, dirs = setup
    engine = _engine(model_path)
    _load(engine, "a", dirs["lora"])
    before = (dict(engine.adapters.current), engine.adapters.host_bytes, engine.blocks.num_used)
    with pytest.raises(AlreadyExists, match="already loaded"):
        _load(engine, "a", dirs["lora"])
    small = engine_for(model_path, num_kv_blocks=160, block_size=4, adapter_slots=2, max_lora_rank=2)
    with pytest.raises(InvalidArgument, match="exceeds this server's --max-lora-rank 2"):
        _load(small, "a", dirs["lora"])
    assert not small.adapters.current and small.adapters.host_bytes == 0
    with pytest.raises(NotFound):
        engine.unregister_adapter("nope")
    assert (dict(engine.adapters.current), engine.adapters.host_bytes, engine.blocks.num_used) == before


def test_more_adapters_than_slots_are_evicted_and_reloaded_from_disk(setup):
    model_path, dirs = setup
    engine = _engine(model_path, host_cache_bytes=1)  # nothing stays in host memory unless pinned
    names = ["lora", "lora-all-r4", "bottleneck"]
    for name in names:
        _load(engine, name, dirs[name])
    prompt = [5, 6, 7, 8]
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    for round_ in range(2):
        for name in names:  # one at a time: 3 adapters through 2 slots
            engine.add_request(f"{name}{round_}", prompt, params, adapter_id=name)
            out = []
            while engine.has_work():
                for o in engine.step():
                    out += o.new_token_ids
            assert out == greedy_reference(reference_model(model_path, name, dirs[name]), prompt, NEW)[0]
    assert engine.adapters.num_evictions >= 2  # the fewest any policy can do for a b c a b c through 2 slots
    assert engine.adapters.num_reads >= 4  # each one placed again was read from disk again
    assert engine.adapters.host_bytes == 0


def test_idle_prefix_adapters_give_their_blocks_back_when_requests_need_them(setup):
    model_path, dirs = setup
    engine = engine_for(model_path, num_kv_blocks=16, block_size=4, max_num_batched_tokens=64, adapter_slots=0)
    prefix_kinds = ["prefix", "ptuning-v2", "prompt", "ptuning"]
    for name in prefix_kinds:
        _load(engine, name, dirs[name])
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    for name in prefix_kinds:  # each leaves its shared prefix on the device when its request is done
        engine.add_request(name, [5, 6], params, adapter_id=name)
        while engine.has_work():
            engine.step()
    assert engine.blocks.num_used == 10  # 2 + 3 + 2 + 3 blocks of idle prefixes
    engine.add_request("big", list(range(3, 33)), SamplingParams(max_new_tokens=10, ignore_eos=True))
    out = []
    for _ in range(50):  # bounded: without reclaiming, the request would wait forever
        for o in engine.step():
            out += o.new_token_ids
        if not engine.has_work():
            break
    assert len(out) == 10 and engine.adapters.num_evictions >= 1
    assert out == greedy_reference(eager(model_path), list(range(3, 33)), 10)[0]


@pytest.mark.parametrize("change", ["deleted", "another-kind"])
def test_a_version_whose_directory_changed_cannot_be_placed_and_changes_nothing(setup, tmp_path, change):
    """A version registered with a plain directory as its source (no snapshot), dropped from host memory, whose
    directory is then deleted or holds another adapter: `place` raises FailedPrecondition naming the version and
    no server path, and takes no slot or block."""
    model_path, dirs = setup
    engine = _engine(model_path, host_cache_bytes=1)
    path = tmp_path / "x"
    shutil.copytree(dirs["lora"], path)
    version = _load(engine, "x", path)
    shutil.rmtree(path)
    if change == "another-kind":
        shutil.copytree(dirs["bottleneck"], path)
    registry = engine.adapters
    assert version.weights is None  # dropped from host memory: it must be read again
    with pytest.raises(FailedPrecondition, match=rf"adapter 'x' \(version {version.version}\)") as error:
        registry.place(version)
    assert str(tmp_path) not in str(error.value)
    assert version.ref is None and sorted(registry._free_slots) == [0, 1] and engine.blocks.num_used == 0
