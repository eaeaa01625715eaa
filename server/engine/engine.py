"""The step loop: admit requests, schedule, run, sample, detect stops, free what finished.

`Engine` is single-threaded: only the thread that calls `step()` may touch it. `quiver.engine.service`
wraps it in a background thread with a thread-safe, async API.

Failures are contained: one that belongs to one request (placing its adapter, its activations or logits
not being finite, drawing its token) ends that request alone, with an output whose `error` says why; the
others go on as if it had never come. A failure of the step's forward, which no request can be blamed
for, ends the requests of that step; the engine then serves on (waiting requests are untouched).
"""

import itertools
import logging
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from quiver.adapters.formats import load_adapter
from quiver.adapters.placement import AdapterVersion
from quiver.adapters.registry import AdapterRegistry
from quiver.adapters.weights import AdapterWeights
from quiver.config import EngineConfig
from quiver.engine.block_manager import BlockManager
from quiver.engine.request import FinishReason, Request, RequestOutput, SamplingParams, Status
from quiver.engine.runner import ModelRunner, QueuedWrites, kv_cache_shape
from quiver.engine.samples import HeldSamples, sample_params
from quiver.engine.scheduler import Scheduler
from quiver.errors import AlreadyExists, InvalidArgument, NotFound, QuiverError, ResourceExhausted
from quiver.kernels import native, packed_linear, select_ops
from quiver.model.loader import LoadedModel

log = logging.getLogger(__name__)

_CPU_KV_BYTES = 1 << 30


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int
    prefix_cache_queried_tokens: int  # known tokens of requests admitted through the prefix cache
    prefix_cache_hit_tokens: int  # of those, tokens whose KV was reused instead of computed
    prompt_tokens_computed: int = 0  # prompt tokens actually run through the model (not taken from the cache)


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer: PreTrainedTokenizerBase = loaded.tokenizer
        model = loaded.model
        self.vocab_size = model.config.vocab_size
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        self.eos_token_ids = _eos_ids(model, loaded.tokenizer)
        if config.num_threads is not None:  # process-wide; threads started later (the engine's) inherit it
            torch.set_num_threads(config.num_threads)
        ops = select_ops(config.kernel_backend, loaded.device)
        self.runner = ModelRunner(
            model, ops=ops, block_size=config.block_size, max_model_len=self.max_model_len,
            adapter_slots=config.adapter_slots,
            max_lora_rank=config.max_lora_rank, max_bottleneck_size=config.max_bottleneck_size,
            cuda_graphs=loaded.device.type == "cuda" and ops.name == "triton" and not config.enforce_eager,
        )
        # sized after the adapter layers took their memory
        num_blocks = config.num_kv_blocks or _blocks_for_budget(model, config, loaded.device)
        self.runner.allocate_kv_cache(num_blocks)
        self.blocks = BlockManager(num_blocks=num_blocks, block_size=config.block_size)
        module_names = {name for name, _ in model.named_modules()}
        self.read_adapter = lambda path: load_adapter(path, model.config, module_names=module_names)
        self.adapters = AdapterRegistry(
            device=self.runner, blocks=self.blocks, read=self.read_adapter, host_cache_bytes=config.host_cache_bytes,
            snapshot_dir=config.adapter_snapshot_dir,
        )
        self.scheduler = Scheduler(
            self.blocks, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            place=self._place, unplace=self._unplace, reclaim=self.adapters.reclaim_blocks,
            prefix_caching=config.enable_prefix_caching,
        )
        self.requests: dict[str, Request] = {}
        self.held = HeldSamples()  # samples 1..n-1 of calls whose sample 0 has not computed its prompt yet
        self._arrivals = itertools.count()
        kernels = ops.name
        if ops.name == "torch" and loaded.device.type == "cpu" and loaded.dtype == torch.float32:
            # built (or loaded from the cache) now, not by the first request's step
            kernels += " with the CPU's C kernels" if native.available() else " (no C kernels: see the log above)"
            kernels += ", oneDNN's packed linears" if packed_linear.available() else ", MKL's F.linear"
        log.info("KV pool: %d blocks of %d tokens, prefix caching %s; kernels: %s", num_blocks, config.block_size,
                 "on" if config.enable_prefix_caching else "off", kernels)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *, adapter_id: str | None = None,
        cache_salt: str | None = None,
    ) -> Request:
        """Validate and queue a request. Raises InvalidArgument, NotFound (adapter), AlreadyExists or
        ResourceExhausted. `cache_salt` is its prefix-cache scope: it shares cached KV blocks only with
        requests of the same salt (None is a scope of its own, the global one)."""
        self._check_room(1)
        request = self._new_request(request_id, prompt_token_ids, params, adapter_id, cache_salt)
        self.scheduler.add(request)
        return request

    def add_samples(
        self, request_ids: list[str], prompt_token_ids: list[int], params: SamplingParams, *,
        adapter_id: str | None = None, cache_salt: str | None = None,
    ) -> list[Request]:
        """Validate and add one request per id, all of the same prompt, sample i with `sample_params(params, i)`:
        the first is queued, the others held until its prompt is computed (see samples.py). All or none:
        raises as `add_request` does."""
        self._check_room(len(request_ids))
        if len(set(request_ids)) != len(request_ids):
            raise InvalidArgument(f"the sample request ids are not distinct: {request_ids!r}")
        requests: list[Request] = []
        try:
            for i, request_id in enumerate(request_ids):
                requests.append(
                    self._new_request(request_id, prompt_token_ids, sample_params(params, i), adapter_id, cache_salt)
                )
        except Exception:
            for request in requests:
                self._unregister(request)
            raise
        self.scheduler.add(requests[0])
        if len(requests) > 1:
            self.held.hold(requests[0], requests[1:])
        return requests

    def _check_room(self, n: int) -> None:
        if len(self.scheduler.waiting) + len(self.held) + n > self.config.max_queue_len:
            raise ResourceExhausted(f"the waiting queue is full ({self.config.max_queue_len} requests); retry later")

    def _new_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter_id: str | None,
        cache_salt: str | None,
    ) -> Request:
        """A validated request, with its adapter version pinned, known by id but not queued."""
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise InvalidArgument(f"cache_salt must be a string or None, got {type(cache_salt).__name__}")
        if request_id in self.requests:
            raise AlreadyExists(f"request id {request_id!r} is already in use")
        version = self.adapters.pin(adapter_id) if adapter_id else None
        try:
            virtual = version.weights_tokens if version is not None else 0
            self._validate(prompt_token_ids, params, virtual_tokens=virtual)
        except Exception:
            if version is not None:
                self.adapters.unpin(version)
            raise
        stops = params.stop_token_ids + (() if params.ignore_eos else tuple(sorted(self.eos_token_ids)))
        request = Request(
            request_id, list(prompt_token_ids), params, adapter=version, arrival=next(self._arrivals),
            cache_salt=cache_salt, stop_ids=frozenset(t for t in stops if t < self.vocab_size),
        )
        self.requests[request_id] = request
        return request

    def _unregister(self, request: Request) -> None:
        """Forget a request that was never queued."""
        if request.adapter is not None:
            self.adapters.unpin(request.adapter)
        del self.requests[request.request_id]

    # ---- adapters (engine thread) --------------------------------------------------------------------

    def register_adapter(self, adapter_id: str, weights: AdapterWeights, *, source=None, replace: bool = False) -> AdapterVersion:
        """Serve `weights` under `adapter_id` (parse them with `read_adapter` first, off the engine thread)."""
        return self.adapters.register(adapter_id, weights, source=source, replace=replace)

    def unregister_adapter(self, adapter_id: str) -> None:
        self.adapters.unregister(adapter_id)

    def _place(self, request: Request) -> bool:
        """The scheduler's `place` (bookkeeping only; the runner performs the queued write): False when there
        is no room now; what the registry raises (its version cannot be made ready) ends this request alone
        (see Scheduler)."""
        return request.adapter is None or self.adapters.place(request.adapter) is not None

    def _unplace(self, request: Request) -> None:
        if request.adapter is not None:
            self.adapters.unplace(request.adapter)

    def _validate(self, prompt: list[int], params: SamplingParams, *, virtual_tokens: int) -> None:
        if not prompt:
            raise InvalidArgument("the prompt is empty")
        bad = next((t for t in prompt if not (isinstance(t, int) and 0 <= t < self.vocab_size)), None)
        if bad is not None:
            raise InvalidArgument(f"token id {bad!r} is outside the vocabulary [0, {self.vocab_size})")
        if virtual_tokens + len(prompt) >= self.max_model_len:
            raise InvalidArgument(
                f"the prompt has {len(prompt)} tokens (+{virtual_tokens} virtual); the context holds "
                f"{self.max_model_len} (prompt + output)"
            )
        pool_tokens = self.blocks.num_blocks * self.blocks.block_size
        need = min(virtual_tokens + len(prompt) + params.max_new_tokens, self.max_model_len)
        if need > pool_tokens:
            raise InvalidArgument(
                f"prompt + max_new_tokens = {need} tokens exceeds the KV cache ({pool_tokens} tokens); ask for fewer"
            )
        if params.stop_strings and self.tokenizer is None:
            raise InvalidArgument("stop strings need a tokenizer, and this engine has none")

    def abort(self, request_id: str) -> RequestOutput:
        """Stop a request now and free its blocks. Raises NotFound for unknown or finished ids."""
        request = self.requests.get(request_id)
        if request is None:
            raise NotFound(f"no running or waiting request with id {request_id!r}")
        self._finish(request, FinishReason.ABORT)
        return _output(request, ())

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.held)

    def step(self) -> list[RequestOutput]:
        """One forward over every scheduled token; returns what each sampled request produced, and the last
        output (with `error`) of each request a failure ended."""
        if self.held:
            for request in self.held.ready():
                self.scheduler.add(request)
        chunks = self.scheduler.schedule()
        outputs = []
        for request, error in self.scheduler.take_failed():
            if not isinstance(error, QuiverError):
                log.error("placing the adapter of request %r failed; ending it alone", request.request_id, exc_info=error)
            outputs.append(self._fail(request, error))
        if not chunks:
            return outputs
        writes = self.adapters.take_writes()
        try:
            sampled = self.runner.execute(chunks, QueuedWrites(writes, self.scheduler.take_copies()))
        except Exception as error:
            log.exception("the forward of a step failed; ending its %d requests", len(chunks))
            self.adapters.written(writes)
            return outputs + [self._fail(chunk.request, error) for chunk in chunks]
        self.adapters.written(writes)  # a version whose write failed leaves the device; its requests end below
        self.scheduler.computed(chunks)  # before any request finishes, so its blocks are cached when freed
        for request, token in sampled:
            if not isinstance(token, int):  # its own failure: its KV may hold anything, e.g. NaN
                self._clear_kv(request)
                outputs.append(self._fail(request, token))
                continue
            request.output_token_ids.append(token)
            reason = self._stop_reason(request, token)
            if reason is not None:
                self._finish(request, reason)
            outputs.append(_output(request, (token,)))
        return outputs

    def _stop_reason(self, request: Request, token: int) -> FinishReason | None:
        params = request.params
        if token in request.stop_ids:
            return FinishReason.STOP
        if params.stop_strings and len(request.output_token_ids) >= params.min_new_tokens:
            tail = self.tokenizer.decode(request.output_token_ids[-_STOP_WINDOW:])
            if any(s in tail for s in params.stop_strings):
                return FinishReason.STOP
        if len(request.output_token_ids) >= params.max_new_tokens or request.prefix_len + request.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _fail(self, request: Request, error: BaseException) -> RequestOutput:
        """End `request` alone because of `error`; its last output, which carries the error."""
        self._finish(request, FinishReason.ABORT)
        return _output(request, (), error=error)

    def _clear_kv(self, request: Request) -> None:
        """Zero the KV blocks only `request` holds and take them out of the prefix cache, before they are freed."""
        blocks = self.blocks.forget_sole(request.block_table)
        if blocks:
            self.runner.clear_blocks(blocks)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        if self.held.discard(request):  # never queued: it holds no blocks
            request.status = Status.FINISHED
        else:
            self.scheduler.finish(request)
        if request.adapter is not None:
            self.adapters.unpin(request.adapter)
        request.finish_reason = reason
        self.runner.sampler.forget(request.request_id)
        del self.requests[request.request_id]

    def reset_prefix_cache(self) -> int:
        """Drop the prefix cache's idle blocks, e.g. to measure cold prompts; returns how many blocks."""
        return self.blocks.drop_cached()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + len(self.held),
            kv_blocks_used=self.blocks.num_used,
            kv_blocks_total=self.blocks.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queried_tokens=self.scheduler.prefix_cache_queried_tokens,
            prefix_cache_hit_tokens=self.scheduler.prefix_cache_hit_tokens,
            prompt_tokens_computed=self.scheduler.prompt_tokens_computed,
        )


_STOP_WINDOW = 32  # output tokens decoded to look for a stop string; stop strings are shorter than this


def _output(request: Request, new_tokens: tuple[int, ...], *, error: BaseException | None = None) -> RequestOutput:
    """Its output for this step; with the new tokens' logprobs, and its prompt logprobs on its first token, if asked."""
    logprobs = ()
    prompt_logprobs = None
    if request.extras and new_tokens:
        if request.params.logprobs is not None:
            logprobs = tuple(request.token_logprobs[-len(new_tokens):])
        if request.prompt_logprobs is not None and len(request.output_token_ids) == len(new_tokens):
            prompt_logprobs = tuple(request.prompt_logprobs)
    return RequestOutput(
        request_id=request.request_id,
        new_token_ids=new_tokens,
        finish_reason=request.finish_reason,
        num_prompt_tokens=len(request.prompt_token_ids),
        num_output_tokens=len(request.output_token_ids),
        error=error,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(ids)


def _blocks_for_budget(model, config: EngineConfig, device: torch.device) -> int:
    per_block = kv_cache_shape(model, num_blocks=1, block_size=config.block_size)
    bytes_per_block = model.dtype.itemsize * int(torch.Size(per_block).numel())
    budget = config.kv_cache_bytes
    if budget is None:
        budget = int(torch.cuda.mem_get_info(device)[0] * 0.9) if device.type == "cuda" else _CPU_KV_BYTES
    return max(1, budget // bytes_per_block)
