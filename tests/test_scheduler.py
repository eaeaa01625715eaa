"""The scheduler alone: token budget, chunked prefill, admission order, preemption (no model needed)."""

from server.engine.block_manager import BlockManager
from server.engine.request import Request, SamplingParams, Status
from server.engine.scheduler import Scheduler


def _req(i: int, n: int) -> Request:
    return Request(str(i), list(range(n)), SamplingParams(max_new_tokens=8), arrival=i)


def _advance(chunks) -> None:
    """What the engine does after a step: mark tokens computed, append a token to sampled requests."""
    for c in chunks:
        sampled = c.samples
        c.request.num_computed_tokens += c.num_tokens
        if sampled:
            c.request.output_token_ids.append(0)


def test_long_prompt_is_chunked_and_decodes_keep_running():
    s = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=8, max_num_batched_tokens=10)
    short, long = _req(0, 3), _req(1, 25)
    s.add(short)
    s.add(long)
    first = s.schedule()
    assert [(c.request.request_id, c.num_tokens, c.samples) for c in first] == [("0", 3, True), ("1", 7, False)]
    _advance(first)
    second = s.schedule()
    # the decode of request 0 goes first; the prefill of request 1 continues in the rest of the budget
    assert [(c.request.request_id, c.num_tokens) for c in second] == [("0", 1), ("1", 9)]


def test_max_num_seqs_limits_admission():
    s = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        s.add(_req(i, 2))
    assert [c.request.request_id for c in s.schedule()] == ["0", "1"]
    assert [r.request_id for r in s.waiting] == ["2"]


def test_out_of_blocks_preempts_the_latest_and_requeues_it_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = _req(0, 4), _req(1, 4)
    s.add(a)
    s.add(b)
    _advance(s.schedule())  # both prefilled: 4 blocks used, each has produced a token
    assert bm.num_free == 0
    chunks = s.schedule()  # a needs a 3rd block: b is preempted
    assert [c.request.request_id for c in chunks] == ["0"]
    assert b.status is Status.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert s.waiting[0] is b and s.num_preemptions == 1
    _advance(chunks)
    s.finish(a)
    again = s.schedule()
    # b is recomputed from its prompt and the token it already produced
    assert [(c.request.request_id, c.num_tokens, c.samples) for c in again] == [("1", 5, True)]
    assert bm.num_used == 3


def test_finish_frees_blocks_of_waiting_and_running_requests():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=100)
    a, b = _req(0, 5), _req(1, 5)
    s.add(a)
    s.add(b)
    s.schedule()
    s.finish(b)  # waiting
    s.finish(a)  # running
    assert bm.num_used == 0 and not s.has_work()
