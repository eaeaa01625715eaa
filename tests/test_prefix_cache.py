"""Automatic prefix caching: requests whose tokens begin with the same full blocks share their KV.

Every engine test runs the same requests with caching on and off: greedy outputs must be identical, and
the hit counters (or the chunks the runner was given) show what was skipped.
"""

import pytest
import torch

from quiver.cli import _engine_config, build_parser
from quiver.engine.block_manager import BlockManager
from quiver.engine.request import Request, SamplingParams, Status
from quiver.engine.scheduler import Scheduler
from tests.support.models import engine_for, run_staggered, save_tiny

PARAMS = SamplingParams(max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    return save_tiny(request.param, tmp_path_factory.mktemp("models"))


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 160, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SYSTEM = _tokens(36, seed=0)  # every chat prompt begins with the same system prompt


def _chat_prompts() -> list[list[int]]:
    suffixes = [_tokens(n, seed=i + 1) for i, n in enumerate([5, 12, 20, 3, 28])]
    prompts = [SYSTEM + s for s in suffixes]
    return prompts + [prompts[1], SYSTEM[:32], SYSTEM]  # a repeat; exactly 4 blocks; the system prompt alone


def _record_chunks(engine) -> list[tuple[str, int, int]]:
    """(request id, first token, tokens) of every chunk the runner is given, from now on."""
    seen: list[tuple[str, int, int]] = []
    execute = engine.runner.execute

    def recording(chunks, copies):
        seen.extend((c.request.request_id, c.request.num_computed_tokens, c.num_tokens) for c in chunks)
        return execute(chunks, copies)

    engine.runner.execute = recording
    return seen


def _run_in_turn(
    engine, runs: list[tuple[list[int], str | None]], *, salts: list[str | None] | None = None
) -> tuple[list[list[int]], list[int]]:
    """Each (prompt, adapter id) alone, one after the other, with its cache salt (`salts`, default None): its
    tokens and its prefix-cache hit tokens."""
    tokens, hits = [], []
    for i, (prompt, adapter_id) in enumerate(runs):
        before = engine.stats().prefix_cache_hit_tokens
        engine.add_request(str(i), prompt, PARAMS, adapter_id=adapter_id, cache_salt=salts[i] if salts else None)
        out: list[int] = []
        while engine.has_work():
            for o in engine.step():
                out += o.new_token_ids
        tokens.append(out)
        hits.append(engine.stats().prefix_cache_hit_tokens - before)
    assert engine.blocks.num_used == sum(len(v.blocks) for v in engine.adapters.current.values())
    return tokens, hits


def test_staggered_requests_sharing_a_system_prompt_match_caching_off(tiny):
    prompts, arrive_at = _chat_prompts(), [0, 0, 2, 5, 9, 14, 20, 26]
    config = dict(num_kv_blocks=128, block_size=8, max_num_batched_tokens=32)
    cached = engine_for(tiny, **config)
    plain = engine_for(tiny, enable_prefix_caching=False, **config)
    assert run_staggered(cached, prompts, PARAMS, arrive_at) == run_staggered(plain, prompts, PARAMS, arrive_at)
    stats = cached.stats()
    assert stats.prefix_cache_hit_tokens >= 6 * 32  # each later request skips at least the system prompt's 4 blocks
    assert plain.stats().prefix_cache_hit_tokens == plain.stats().prefix_cache_queried_tokens == 0
    assert cached.blocks.num_used == plain.blocks.num_used == 0


def test_a_later_request_computes_only_what_is_not_cached(tiny):
    first = _tokens(40, seed=5)  # 5 full blocks of 8
    runs = [
        (first, None),
        (first[:24] + _tokens(10, seed=6), None),  # 3 blocks in common
        (first[:32], None),  # exactly 4 blocks: the last one is computed anyway, its row samples
        (first, None),  # all 5 blocks: the 5th is computed again for its last token
    ]
    config = dict(num_kv_blocks=64, block_size=8, max_num_batched_tokens=64)
    cached = engine_for(tiny, **config)
    chunks = _record_chunks(cached)
    tokens, hits = _run_in_turn(cached, runs)
    assert tokens == _run_in_turn(engine_for(tiny, enable_prefix_caching=False, **config), runs)[0]
    assert hits == [0, 24, 24, 32]
    first_chunks = {rid: (begin, n) for rid, begin, n in reversed(chunks)}
    assert first_chunks == {"0": (0, 40), "1": (24, 10), "2": (24, 8), "3": (32, 8)}


@pytest.fixture(scope="module")
def lora_engines(model_path, zoo):
    """Engines with caching on and off serving two LoRA adapters, x and y."""
    engines = []
    for caching in (True, False):
        engine = engine_for(model_path, num_kv_blocks=64, block_size=4, adapter_slots=2, max_lora_rank=8,
                            enable_prefix_caching=caching)
        for adapter_id, name in (("x", "lora"), ("y", "lora-all-r4")):
            engine.register_adapter(adapter_id, engine.read_adapter(zoo[name]), source=zoo[name])
        engines.append(engine)
    return engines


def test_adapters_never_share_blocks_and_a_replaced_one_misses(lora_engines, zoo):
    cached, plain = lora_engines
    prompt = _tokens(14, seed=7)  # 3 full blocks of 4 can be shared
    want, _ = _run_in_turn(plain, [(prompt, "x"), (prompt, "y"), (prompt, None)])
    assert len({tuple(t) for t in want}) == 3  # x, y and the base model each give their own tokens
    tokens, hits = _run_in_turn(cached, [(prompt, "x"), (prompt, "y"), (prompt, None), (prompt, "x")])
    assert tokens == want + want[:1]
    assert hits == [0, 0, 0, 12]  # only x's own blocks are reused
    cached.register_adapter("x", cached.read_adapter(zoo["lora"]), source=zoo["lora"], replace=True)
    tokens, hits = _run_in_turn(cached, [(prompt, "x")])
    assert tokens == want[:1] and hits == [0]  # the same weights, but a new version: nothing is reused


def test_an_adapter_prefix_of_whole_blocks_is_followed_by_cached_blocks(model_path, zoo):
    """A prefix-tuning adapter of 5 virtual tokens, in blocks of 5: the prompt's blocks come after its own."""
    prompt = _tokens(17, seed=8)
    runs = [(prompt, "p"), (prompt[:12] + _tokens(4, seed=9), "p"), (prompt, None)]
    results = []
    for caching in (True, False):
        engine = engine_for(model_path, num_kv_blocks=64, block_size=5, adapter_slots=0, enable_prefix_caching=caching)
        engine.register_adapter("p", engine.read_adapter(zoo["prefix"]), source=zoo["prefix"])
        results.append(_run_in_turn(engine, runs))
    (tokens, hits), (plain_tokens, _) = results
    assert tokens == plain_tokens
    assert hits == [0, 10, 0]


def test_a_tiny_pool_evicts_cached_blocks_and_preempts_yet_matches_caching_off(tiny):
    prompts = _chat_prompts() + [_tokens(30, seed=20 + i) for i in range(3)]
    arrive_at = [0, 0, 1, 2, 3, 5, 6, 8, 9, 10, 11]
    config = dict(num_kv_blocks=16, block_size=8, max_num_batched_tokens=48)
    cached = engine_for(tiny, **config)
    tokens = run_staggered(cached, prompts, PARAMS, arrive_at)
    assert tokens == run_staggered(engine_for(tiny, enable_prefix_caching=False, **config), prompts, PARAMS, arrive_at)
    assert all(len(t) == PARAMS.max_new_tokens for t in tokens.values())
    assert cached.scheduler.num_preemptions > 0 and cached.blocks.num_evictions > 0
    assert cached.stats().prefix_cache_hit_tokens > 0
    assert cached.blocks.num_used == 0 and cached.blocks.num_free == 16


def test_a_cache_salt_scopes_what_is_shared(tiny):
    """Requests share cached blocks only with requests of the same salt; None is a scope of its own."""
    engine = engine_for(tiny, num_kv_blocks=64, block_size=8)
    prompt = _tokens(30, seed=11)  # 3 full blocks can be shared (the 4th holds its last token)
    salts = ["alice", "alice", "bob", None, None, "bob"]
    tokens, hits = _run_in_turn(engine, [(prompt, None)] * len(salts), salts=salts)
    assert hits == [0, 24, 0, 0, 24, 24]
    assert all(t == tokens[0] for t in tokens)


def _advance(scheduler: Scheduler, chunks) -> None:
    """What the engine does after a step, with a token for each sampled request."""
    sampled = [c.request for c in chunks if c.samples]
    scheduler.computed(chunks)
    for request in sampled:
        request.output_token_ids.append(0)


def test_admission_short_of_blocks_gives_back_the_cached_ones_it_matched():
    bm = BlockManager(num_blocks=4, block_size=2)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    first = Request("a", [1, 2, 3, 4, 5], SamplingParams(max_new_tokens=1))
    s.add(first)
    _advance(s, s.schedule())
    s.finish(first)
    assert bm.num_cached == 2 and bm.num_used == 0  # [1, 2] and [3, 4]; the partial block is free
    held: list[int] = []
    assert bm.grow(held, 4)  # the free blocks go to another holder (say an adapter prefix); the cached stay
    later = Request("b", [1, 2, 3, 4, 5, 6, 7, 8], SamplingParams(max_new_tokens=1))
    s.add(later)
    assert s.schedule() == []  # it matches 2 cached blocks but finds none for the rest
    assert later.status is Status.WAITING and later.block_table == [] and later.num_computed_tokens == 0
    assert bm.num_cached == 2 and bm.num_used == 2
    bm.release(held)
    chunks = s.schedule()
    assert [(c.request.request_id, c.request.num_computed_tokens, c.num_tokens) for c in chunks] == [("b", 4, 4)]
    assert s.prefix_cache_hit_tokens == 4 and s.prefix_cache_queried_tokens == 5 + 8


def test_serve_flag_turns_it_off():
    assert _engine_config(build_parser().parse_args(["serve"])).enable_prefix_caching
    assert not _engine_config(build_parser().parse_args(["serve", "--no-prefix-caching"])).enable_prefix_caching
