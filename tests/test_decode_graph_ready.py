"""A graph-ready decode (issue 18): a decode step's forward performs no host synchronisation, and reads its
per-step inputs from buffers whose storage stays the same from one decode step to the next of its batch-size
bucket — for the base model and every adapter kind decoding in one batch.

No host synchronisation: the forward runs under a TorchDispatchMode that fails on any op that reads a tensor's value back to the host
(`_local_scalar_dense`, `item`, `is_nonzero`, `nonzero`, ...) and with `Tensor.tolist` / `Tensor.item` /
`Tensor.__bool__` patched to fail, for base, LoRA (two configurations), bottleneck, prefix tuning, P-tuning v2,
prompt tuning and P-tuning requests decoding in one batch. What a step reads back after its forward (the tokens,
the finiteness check) is outside the forward and not checked here."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from quiver.engine.request import SamplingParams
from quiver.model.step_inputs import FreshInputs, StepInputs, bucket_of
from tests.support.adapter_zoo import save_zoo
from tests.support.models import engine_for, run_together, save_tiny

SYNCING = ("_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "allclose", "masked_select")


class NoHostSync(TorchDispatchMode):
    """Fails on any dispatched op that reads device values back to the host; counts the ops it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING:
            raise AssertionError(f"host synchronisation in the decode forward: aten.{name}")
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _refuse(name):
    def refused(self, *args, **kwargs):
        raise AssertionError(f"Tensor.{name} in the decode forward")
    return refused


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def engine(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model_path = save_tiny(request.param, root)
    engine = engine_for(model_path, num_kv_blocks=128, block_size=4, max_num_batched_tokens=64, adapter_slots=4,
                        max_lora_rank=8, max_bottleneck_size=8)
    for name, path in save_zoo(model_path, root / "adapters").items():
        engine.register_adapter(name, engine.read_adapter(path), source=path)
    return engine


def _decoding(engine) -> list[str | None]:
    """The base model and every adapter of the zoo, one request each, all prompts computed: the next steps decode."""
    ids = [None, *engine.adapters.current]
    assert len(ids) >= 8  # the base model and every kind of the zoo
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    for i, adapter_id in enumerate(ids):
        engine.add_request(f"r{i}", [5 + i, 6, 7, 8, 9, 10], params, adapter_id=adapter_id)
    while any(not r.output_token_ids for r in engine.requests.values()):
        engine.step()
    assert all(r.num_computed_tokens == r.num_tokens - 1 for r in engine.requests.values())
    return ids


def test_a_mixed_decode_forward_never_reads_back_to_the_host(engine, monkeypatch):
    ids = _decoding(engine)

    runner = engine.runner
    forward = runner.forward
    probe = NoHostSync()
    checked = []

    def guarded(*args, **kwargs):
        with monkeypatch.context() as m:
            for name in ("tolist", "item", "__bool__"):
                m.setattr(torch.Tensor, name, _refuse(name))
            with probe:
                out = forward(*args, **kwargs)
        checked.append(args or tuple(kwargs))
        return out

    monkeypatch.setattr(runner, "forward", guarded)
    for _ in range(3):  # decode steps of every request at once
        outputs = engine.step()
        assert len(outputs) == len(ids) and all(out.error is None for out in outputs)
    assert len(checked) == 3 and probe.ops > 0
    for request_id in list(engine.requests):
        engine.abort(request_id)


def test_decode_steps_of_one_bucket_read_the_same_buffers(engine, monkeypatch):
    ids = _decoding(engine)
    runner, context = engine.runner, engine.runner.context
    forward = runner.forward
    seen = []

    def recording(*, input_ids, positions, **kwargs):
        step = context.step
        tensors = {"input_ids": input_ids, "positions": positions, "slot_mapping": step.slot_mapping,
                   "block_tables": step.block_tables, "seq_lens": step.seq_lens, "query_starts": step.query_starts,
                   "seg_starts": step.adapters.seg_starts, "seg_slots": step.adapters.seg_slots}
        seen.append(({name: t.data_ptr() for name, t in tensors.items()}, input_ids.shape[0]))
        return forward(input_ids=input_ids, positions=positions, **kwargs)

    monkeypatch.setattr(runner, "forward", recording)
    engine.step()
    engine.step()
    engine.abort("r0")  # one sequence fewer: the same bucket of batch sizes
    engine.step()
    assert [n for _, n in seen] == [len(ids), len(ids), len(ids) - 1]
    assert seen[0][0] == seen[1][0] == seen[2][0]
    engine.add_request("prefill", [3, 4, 5, 6, 7], SamplingParams(max_new_tokens=2))  # a prefill step: built afresh
    engine.step()
    assert seen[3][0]["input_ids"] != seen[0][0]["input_ids"]
    for request_id in list(engine.requests):
        engine.abort(request_id)


def test_buckets_and_buffers():
    assert [bucket_of(n) for n in (1, 2, 3, 5, 100, 512, 513, 1100)] == [1, 2, 4, 8, 128, 512, 1024, 1536]
    inputs = StepInputs(max_blocks=2, device=torch.device("cpu"))
    buffers = inputs.for_decode(3)
    assert inputs.for_decode(4) is buffers and inputs.for_decode(5) is not buffers
    assert inputs.for_step([1, 1, 1]) is buffers and isinstance(inputs.for_step([1, 2]), FreshInputs)
    tables = buffers.fill_tables([[1, 2], [3, 4], [5, 6]])
    assert tables.tolist() == [[1, 2], [3, 4], [5, 6]] and tables.data_ptr() == buffers.block_tables.data_ptr()
    assert buffers.fill_tables([[7], [8]])[:, :1].tolist() == [[7], [8]]  # narrower: the columns beyond are not read
    assert buffers.fill_tables([[1, 2, 3]]).tolist() == [[1, 2, 3]]  # wider than max_blocks: the buffer grows
    ids = buffers.fill("input_ids", [9, 8])
    assert ids.tolist() == [9, 8] and ids.dtype == torch.int64 and ids.data_ptr() == buffers.buffers["input_ids"].data_ptr()


class ReplayTwice:
    """`DecodeGraphs`' interface on CPU: 'captures' by running the forward once and 'replays' by running it again,
    as a capture's warm-up run and the first replay do on CUDA: the step's K/V are written twice."""

    enabled = True

    def __init__(self) -> None:
        self.keys: list = []

    def run(self, key, forward):
        self.keys.append(key)
        forward()
        return forward()


def _tokens(engine, ids: list[str | None], steps: int) -> dict[str, list[int]]:
    requests = [(f"r{i}", [5 + i, 6, 7, 8 + i % 3], adapter_id) for i, adapter_id in enumerate(ids)]
    return run_together(engine, requests, SamplingParams(max_new_tokens=steps, ignore_eos=True))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_decode_steps_give_the_tokens_of_unpadded_ones(backend, tmp_path):
    """Decode steps padded to their bucket (padding rows into the scratch block, one segment of no adapter for
    them and empty ones after, every loaded adapter's ops run) with their forward run twice per step: the same
    tokens as plain steps, for the base model and every kind mixed, 9 sequences (bucket 16) then fewer."""
    model_path = save_tiny("llama", tmp_path)
    adapters = save_zoo(model_path, tmp_path / "adapters")
    engines = []
    for padded in (False, True):
        engine = engine_for(model_path, num_kv_blocks=128, block_size=4, max_num_batched_tokens=64, adapter_slots=4,
                            max_lora_rank=8, max_bottleneck_size=8, kernel_backend=backend)
        for name, path in adapters.items():
            engine.register_adapter(name, engine.read_adapter(path), source=path)
        if padded:
            engine.runner.pad_decode, engine.runner.graphs = True, ReplayTwice()
        engines.append(engine)
    ids = [None, *engines[0].adapters.current][:9]
    ids += [None] * (9 - len(ids))
    plain, padded = (_tokens(engine, ids, steps=4) for engine in engines)
    assert padded == plain and len(plain) == 9
    # then a mix without the bottleneck adapter, still loaded: its layers run their ops for slots not in the step
    assert engines[1].runner._adapter_layout()[2]  # a bottleneck non-linearity is loaded
    mix = ["lora", None, "lora-all-r4"]
    plain, padded = (_tokens(engine, mix, steps=3) for engine in engines)
    assert padded == plain and len(plain) == 3
    keys = engines[1].runner.graphs.keys
    assert {size for size, _ in keys} == {16, 4} and any(layout is not None for _, layout in keys)


class _FakeGraph:
    """What DecodeGraphs keeps of a capture, on CPU: replaying runs the captured forward again."""

    def __init__(self, forward) -> None:
        self.forward = forward

    def replay(self) -> None:
        self.forward()


def test_decode_graphs_keep_the_most_recent_graphs_and_fall_back_to_eager_when_capture_fails(monkeypatch):
    """The graph cache's bookkeeping, with capture replaced (no CUDA here): a graph per key, reused while kept,
    at most max_graphs kept (the least recently replayed dropped), and a capture that raises turns graphs off
    for good, that step's output coming from the eager forward."""
    from quiver.model.graphs import DecodeGraphs

    graphs = DecodeGraphs(max_graphs=2)
    monkeypatch.setattr(graphs, "_capture", lambda forward: (_FakeGraph(forward), forward()))
    out = torch.zeros(1)  # the "graph's" output buffer: a replay refills it in place

    def forward():
        return out.add_(1)

    assert graphs.run("a", forward) is out and out.item() == 2  # captured (run once) and replayed
    graphs.run("b", forward)
    graphs.run("a", forward)  # "a" most recent: "b" goes first
    graphs.run("c", forward)
    assert len(graphs) == 2 and graphs.captures == 3
    graphs.run("a", forward)
    graphs.run("b", forward)  # dropped before: captured again
    assert graphs.captures == 4 and graphs.enabled

    def broken(forward):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_capture", broken)
    eager = torch.full((1,), 7.0)
    assert graphs.run("d", lambda: eager) is eager
    assert not graphs.enabled and len(graphs) == 0


def test_enforce_eager_reaches_the_engine_config_and_cpu_engines_have_no_graphs(tmp_path):
    from quiver.cli import _engine_config, build_parser

    assert not _engine_config(build_parser().parse_args(["serve"])).enforce_eager
    assert _engine_config(build_parser().parse_args(["serve", "--enforce-eager"])).enforce_eager
    engine = engine_for(save_tiny("llama", tmp_path), num_kv_blocks=16, block_size=4, adapter_slots=1)
    assert engine.runner.graphs is None and not engine.runner.pad_decode  # graphs: CUDA with the triton backend only
