"""The scheduler alone: token budget, chunked prefill, admission order, preemption (no model needed)."""

from quiver.engine.block_manager import BlockManager
from quiver.engine.request import Request, SamplingParams, Status
from quiver.engine.scheduler import Scheduler
from tests.support.handles import adapter_handle


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


def _for(i: int, adapter: str | None) -> Request:
    """A 3-token request for adapter (id, version 1), or for the base model."""
    request = _req(i, 3)
    request.adapter = adapter_handle(adapter) if adapter else None
    return request


def _admitted(s: Scheduler) -> list[str]:
    """One step: the ids of the requests it started, after which each sampled request has its token."""
    chunks = s.schedule()
    started = [c.request.request_id for c in chunks if c.request.num_computed_tokens == 0]
    _advance(chunks)
    return started


def test_a_request_that_cannot_be_placed_is_passed_over_and_the_rest_keep_their_order():
    full = {("x", 1)}  # no room for x's adapter now
    asked = []

    def place(request: Request) -> bool:
        asked.append(request.request_id)
        return request.kv_adapter not in full

    s = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=8, max_num_batched_tokens=100, place=place)
    for i, adapter in enumerate(["x", None, "x", "y", None]):
        s.add(_for(i, adapter))
    assert _admitted(s) == ["1", "3", "4"]
    assert asked == ["0", "1", "3", "4"]  # "2" wants the same adapter version as "0": not asked again this step
    assert [r.request_id for r in s.waiting] == ["0", "2"] and s.waiting[0].skipped_steps == 1
    full.clear()
    assert _admitted(s) == ["0", "2"]


def test_a_request_passed_over_in_too_many_steps_becomes_a_barrier():
    room = []
    s = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=8, max_num_batched_tokens=100,
                  place=lambda r: r.kv_adapter is None or bool(room), max_skipped_steps=2)
    s.add(_for(0, "x"))
    started = []
    for i in range(1, 5):  # a base-model request arrives each step
        s.add(_for(i, None))
        started.append(_admitted(s))
    assert started == [["1"], ["2"], [], []]  # passed over twice; then nothing behind it starts
    room.append(True)
    assert _admitted(s) == ["0", "3", "4"]  # it goes first, the others in their order


def test_a_placement_that_raises_fails_that_request_alone():
    def place(request: Request) -> bool:
        if request.request_id == "1":
            raise OSError("its weights cannot be read")
        return True

    bm = BlockManager(num_blocks=64, block_size=4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100, place=place)
    requests = [_for(i, "x") for i in range(3)]
    for request in requests:
        s.add(request)
    assert _admitted(s) == ["0", "2"]
    [(failed, error)] = s.take_failed()
    assert failed is requests[1] and isinstance(error, OSError) and failed.status is Status.FINISHED
    assert s.take_failed() == [] and not s.waiting
    s.finish(failed)  # the engine ends it as it ends any request: nothing left to free
    assert bm.num_used == 2


def test_token_ids_is_a_slice_of_all_token_ids():
    request = _req(0, 5)
    request.output_token_ids = [50, 51, 52]
    every = request.all_token_ids
    for begin in range(9):
        for end in range(begin, 9):
            assert request.token_ids(begin, end) == every[begin:end], (begin, end)
