"""Build one step's batch tensors, run the frozen model once over all scheduled tokens, sample.

Logits are computed only for the rows that are sampled (the last row of each chunk that reaches the end
of its request's known tokens), and for the prompt rows of requests asking prompt logprobs. Requests asking
penalties, min_new_tokens or logprobs have their rows processed before the pick (penalties.py, logprobs.py).
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from quiver.adapters.placement import DeviceWrite, PrefixWrite
from quiver.adapters.weights import BOTTLENECK_SITES, BottleneckWeights, LoraWeights, PrefixWeights
from quiver.engine import logprobs
from quiver.engine.penalties import apply_penalties
from quiver.engine.request import Request
from quiver.engine.sampler import Sampler, finite_rows, not_finite
from quiver.engine.scheduler import ScheduledChunk
from quiver.errors import FailedPrecondition, QuiverError
from quiver.kernels import KernelOps, packed_linear
from quiver.model.batch import AdapterBatch, StepContext, build_step
from quiver.model.forward import CompactDecoder
from quiver.model.graphs import DecodeGraphs
from quiver.model.layers import AdapterLinear, install_adapter_layers, plan_layers
from quiver.model.step_inputs import FreshInputs, InputBuffers, StepInputs

log = logging.getLogger(__name__)


def kv_cache_shape(model: PreTrainedModel, *, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """[L, 2, NB, BS, KVH, D] for this model's attention layers."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return (cfg.num_hidden_layers, 2, num_blocks, block_size, kv_heads, head_dim)


@dataclass(frozen=True)
class QueuedWrites:
    """What a step writes on the device before its forward: the registry's adapter writes (first: a copy may
    read the last block of an adapter prefix written this step), then the scheduler's block copies."""

    adapters: Sequence[DeviceWrite] = ()
    copies: Sequence[tuple[int, int]] = ()  # (src, dst) KV blocks


class ModelRunner:
    def __init__(
        self,
        model: PreTrainedModel,
        *,
        ops: KernelOps,
        block_size: int,
        max_model_len: int,  # virtual + real tokens of a sequence at most: sizes the decode steps' block tables
        adapter_slots: int = 0,  # weight-adapter (LoRA, bottleneck) slots; 0: no adapter layers
        max_lora_rank: int = 0,
        max_bottleneck_size: int = 0,
        cuda_graphs: bool = False,  # decode steps replayed from CUDA graphs (graphs.py); needs CUDA, Triton ops
    ) -> None:
        self.model = model
        head = model.get_output_embeddings()
        packed = packed_linear.pack(head.weight, head.bias)  # float32 on the CPU: oneDNN's layout (packed_linear.py)
        self.lm_head: Callable[[torch.Tensor], torch.Tensor] = head if packed is None else packed
        self.ops = ops
        self.device = model.device
        self.block_size = block_size
        self.kv_cache: torch.Tensor | None = None  # [L, 2, NB, BS, KVH, D], by allocate_kv_cache
        self.sampler = Sampler()
        self.inputs = StepInputs(max_blocks=-(-max_model_len // block_size), device=self.device)  # decode steps'
        self.context = StepContext()  # the current step, for the forward and the adapter layers
        self.adapter_slots = adapter_slots
        self.max_lora_rank = max_lora_rank
        self.max_bottleneck_size = max_bottleneck_size
        self.adapter_layers: dict[str, AdapterLinear] = {}
        if adapter_slots:
            self.adapter_layers = install_adapter_layers(
                model, context=self.context, ops=ops, num_slots=adapter_slots, max_rank=max_lora_rank,
                bottleneck_size=max_bottleneck_size,
                bottleneck_sites=frozenset(BOTTLENECK_SITES.values()),
            )
        self.forward = CompactDecoder(model, context=self.context)  # after the adapter layers: it fuses their bases
        self._layout: tuple | None = None  # _adapter_layout's, until an adapter is written or cleared
        # the last step's adapter plans, by its segments, slots and non-linearities, until an adapter is written or
        # cleared: decode steps of the same requests have the same segments, and the plans are ~0.3 ms of Python
        self._plans: tuple | None = None
        self.graphs = DecodeGraphs() if cuda_graphs else None
        # decode steps padded to their bucket's size, their adapter ops those of every loaded adapter: what a graph
        # needs (on whenever graphs are; tests turn it on alone to check the padded forward on CPU)
        self.pad_decode = cuda_graphs

    @torch.inference_mode()
    def execute(
        self, chunks: list[ScheduledChunk], queued: QueuedWrites
    ) -> list[tuple[Request, int | Exception]]:
        """Perform the queued writes (adapters: `perform_writes`; block copies), run the chunks; return
        (request, outcome) for each chunk whose `samples` is true, the outcome being its next token or the
        error that ends it (see Sampler.sample), and (request, `not_finite(request)`) for every chunk whose
        hidden states were not finite, sampled or not: the KV it wrote is untrusted. A row's hidden state
        depends on its own request's tokens alone, so only requests whose own computation overflowed are
        reported. A chunk whose adapter's write failed is not run: its outcome is that write's error.

        Chunks are packed grouped by weight-adapter slot, so that requests sharing an adapter form one segment.
        """
        self.perform_writes(queued.adapters)
        unwritten = {w.version: w.error for w in queued.adapters if w.error is not None}
        copies = queued.copies
        dropped = [(c.request, unwritten[c.request.adapter]) for c in chunks if c.request.adapter in unwritten]
        if dropped:  # their copies, into their own blocks, are skipped: the engine zeroes those blocks
            chunks = [c for c in chunks if c.request.adapter not in unwritten]
            if not chunks:
                return dropped
        chunks = sorted(chunks, key=_slot_of)
        dev = self.device
        # a decode step (one token a sequence) writes its inputs into its bucket's persistent buffers, a prefill afresh
        inputs = self.inputs.for_step([c.num_tokens for c in chunks])
        if copies:
            src, dst = zip(*copies)
            self.ops.copy_blocks(self.kv_cache, torch.tensor(src, device=dev), torch.tensor(dst, device=dev))
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sampled: list[Request] = []
        extras: list[int] = []  # indices in `sampled` of the requests whose logits need more than a plain pick
        prompt_spans: list[tuple[Request, int, int, int]] = []  # chunks whose prompt rows give prompt logprobs
        bs = self.block_size
        for chunk in chunks:
            request, begin = chunk.request, chunk.request.num_computed_tokens
            end = begin + chunk.num_tokens
            offset = request.prefix_len  # real tokens follow the adapter's virtual ones
            input_ids += request.token_ids(begin, end)
            table = request.block_table
            if chunk.num_tokens == 1:  # a decode row
                p = offset + begin
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            else:
                positions += range(offset + begin, offset + end)
                slots += [table[p // bs] * bs + p % bs for p in range(offset + begin, offset + end)]
            starts.append(starts[-1] + chunk.num_tokens)
            seq_lens.append(offset + end)
            if request.extras:  # one flag: a batch where no request asks anything more pays nothing else
                if chunk.samples:
                    extras.append(len(sampled))
                if request.needs_prompt_rows:
                    prompt_spans.append((request, begin, end, starts[-2]))
            if chunk.samples:
                sample_rows.append(starts[-1] - 1)
                sampled.append(request)
        tables = [c.request.block_table for c in chunks]
        num_rows = len(input_ids)
        padded = self.pad_decode and isinstance(inputs, InputBuffers)
        if padded:  # rows up to the bucket's size: token 0 at position 0, its K/V into the scratch block
            pad, scratch = inputs.size - num_rows, self.kv_cache.shape[2] - 1
            input_ids += [0] * pad
            positions += [0] * pad
            slots += [scratch * bs] * pad
            starts += range(starts[-1] + 1, starts[-1] + 1 + pad)
            seq_lens += [1] * pad
            tables += [[scratch]] * pad
        adapters = self._adapter_batch(chunks, starts, inputs, padded=padded)
        step = build_step(
            kv_cache=self.kv_cache, ops=self.ops, slot_mapping=slots, block_tables=tables, seq_lens=seq_lens,
            query_starts=starts, adapters=adapters, device=dev, inputs=inputs,
        )
        ids, pos = inputs.fill("input_ids", input_ids), inputs.fill("positions", positions)
        with self.context.stepping(step):
            if padded and self.graphs is not None and self.graphs.enabled:
                key = (inputs.size, self._adapter_layout()[0] if adapters is not None else None)
                hidden = self.graphs.run(key, lambda: self.forward(input_ids=ids, positions=pos))
            else:
                hidden = self.forward(input_ids=ids, positions=pos)
        hidden = hidden[:num_rows]  # [T, hidden]
        # cheap, and also false if a huge sum overflows (checked exactly then); read after sampling, which waits
        finite = hidden.sum(dtype=torch.float32).isfinite()
        outcomes: list[tuple[Request, int | Exception]] = []
        if prompt_spans:
            logprobs.record_prompt(self.lm_head, hidden, prompt_spans)
        if sampled:
            # every row samples (a decode step): the rows as they are, no gather
            rows = hidden if len(sample_rows) == num_rows else hidden[sample_rows]
            logits = self.lm_head(rows).float()  # [B_sampled, V]
            if extras:
                rows_finite = finite_rows(logits)  # the model's own logits, before penalties mask tokens to -inf
                apply_penalties(logits, sampled, extras)
                tokens = self.sampler.pick(logits, sampled, rows_finite)
                logprobs.record_sampled(logits, sampled, extras, tokens)
            else:
                tokens = self.sampler.sample(logits, sampled)
            outcomes = list(zip(sampled, tokens, strict=True))
        if not finite:
            outcomes = _with_overflows(outcomes, chunks, starts, hidden)
        return outcomes + dropped

    def _adapter_batch(
        self, chunks: list[ScheduledChunk], starts: list[int], inputs: InputBuffers | FreshInputs, *, padded: bool
    ) -> AdapterBatch | None:
        """One segment per run of consecutive chunks with the same weight-adapter slot, with every adapter layer's
        plans for them; None if no chunk has one. `padded` (a decode step padded to its bucket, `starts` holding
        the padding rows): one more segment of no adapter holds the padding rows and empty ones follow, up to as
        many segments as the bucket has rows, and the layers run the ops of every adapter they hold."""
        if not self.adapter_layers or all(_slot_of(c) < 0 for c in chunks):
            return None
        seg_starts, seg_slots = [0], []
        for chunk, end in zip(chunks, starts[1:]):
            slot = _slot_of(chunk)
            if seg_slots and seg_slots[-1] == slot:
                seg_starts[-1] = end
            else:
                seg_slots.append(slot)
                seg_starts.append(end)
        activations = frozenset(c.request.adapter.activation for c in chunks if _slot_of(c) >= 0 and c.request.adapter.activation)
        slots = frozenset(w for w in seg_slots if w >= 0)
        if padded:
            extra = inputs.size - len(seg_slots)
            seg_starts += [starts[-1]] * extra
            seg_slots += [-1] * extra
            _, slots, activations = self._adapter_layout()
        key = (tuple(seg_starts), tuple(seg_slots), slots, activations)
        if self._plans is None or self._plans[0] != key:
            self._plans = key, plan_layers(
                list(self.adapter_layers.values()), ops=self.ops, seg_starts=seg_starts, seg_slots=seg_slots,
                slots=slots, activations=activations, device=self.device,
            )
        lora_plans, bottleneck_plans = self._plans[1]
        return AdapterBatch(
            seg_starts=inputs.fill("seg_starts", seg_starts),
            seg_slots=inputs.fill("seg_slots", seg_slots),
            activations=activations,
            slots=slots,
            lora_plans=lora_plans,
            bottleneck_plans=bottleneck_plans,
        )

    def _adapter_layout(self) -> tuple[tuple, frozenset[int], frozenset[str]]:
        """(key, slots, activations) of the adapters the layers hold now: the key (which layers hold LoRA weights,
        which hold bottleneck weights, and their non-linearities) names a decode graph; a padded step runs the
        ops of those slots and non-linearities. Cached until an adapter is written or cleared."""
        if self._layout is None:
            layers = list(self.adapter_layers.values())
            slots = frozenset().union(*(layer.lora_slots | layer.bn_slots for layer in layers))
            activations = frozenset(a for layer in layers if layer.bottleneck_size for a in layer.bn_activation if a)
            key = (tuple(i for i, layer in enumerate(layers) if layer.lora_slots),
                   tuple(i for i, layer in enumerate(layers) if layer.bn_slots), tuple(sorted(activations)))
            self._layout = (key, slots, activations)
        return self._layout

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The pool of `num_blocks` blocks, and one more: the scratch block that padding rows write into."""
        num_blocks += 1
        shape = kv_cache_shape(self.model, num_blocks=num_blocks, block_size=self.block_size)
        self.kv_cache = torch.zeros(shape, dtype=self.model.dtype, device=self.device)

    # ---- adapter writes (queued by the registry, performed before the forward) -------------------------

    @property
    def num_adapter_slots(self) -> int:
        return self.adapter_slots

    def perform_writes(self, writes: Sequence[DeviceWrite]) -> None:
        """Perform `writes` in order: slot writes and clears, prefix writes, prompt-adapter prefills (whose KV
        must come out finite). One that raises is undone (its slot cleared, its blocks zeroed, so that nothing
        it wrote reaches the next holder), gets its `error` set, and the others go on (a failed clear of an
        evicted slot raises: no request is to blame)."""
        for write in writes:
            try:
                self._perform(write)
            except Exception as error:
                if write.version is None:  # clearing an evicted slot: no request to blame
                    raise
                if not isinstance(error, QuiverError):
                    log.error("writing %s failed; ending its requests alone", write.version.label, exc_info=error)
                if isinstance(write, PrefixWrite):
                    self.clear_blocks(list(write.blocks))
                else:
                    self.clear_adapter(write.slot)
                write.error = error

    def _perform(self, write: DeviceWrite) -> None:
        if not isinstance(write, PrefixWrite):
            if write.weights is None:
                self.clear_adapter(write.slot)
            else:
                self.write_adapter(write.slot, write.weights)
            return
        blocks = list(write.blocks)
        if isinstance(write.weights, PrefixWeights):
            self.write_prefix(write.weights.prefix, blocks)
        else:
            self.prefill_embeddings(write.weights.embeddings, blocks)
        if not self.blocks_finite(blocks):
            raise FailedPrecondition(
                f"{write.version.label}: the keys and values of its virtual tokens are not finite (they overflow "
                "the model's dtype), so it cannot be served"
            )

    @torch.inference_mode()
    def write_adapter(self, slot: int, weights: LoraWeights | BottleneckWeights) -> None:
        """Put a LoRA or bottleneck adapter's weights in `slot` of every adapter layer (rank 0 where it has none)."""
        self.clear_adapter(slot)
        if isinstance(weights, LoraWeights):
            for name, module in weights.modules.items():
                self.adapter_layers[name].set_lora(slot, a=module.a, b=module.b, scale=module.scale)
            return
        for name, site in weights.sites.items():
            self.adapter_layers[name].set_bottleneck(
                slot, down=site.down, down_bias=site.down_bias, up=site.up, up_bias=site.up_bias,
                scale=weights.scaling, activation=weights.non_linearity,
            )

    @torch.inference_mode()
    def clear_blocks(self, blocks: list[int]) -> None:
        """Zero the KV of `blocks` (untrusted values a failed request left), so that no later holder reads them:
        attention may read a block's entries beyond its holder's length, masked, and 0 · NaN is NaN."""
        self.kv_cache.index_fill_(2, torch.tensor(blocks, dtype=torch.int64, device=self.device), 0)

    @torch.inference_mode()
    def blocks_finite(self, blocks: list[int]) -> bool:
        """Whether every KV entry of `blocks` is finite (checked once when an adapter prefix is written)."""
        ids = torch.tensor(blocks, dtype=torch.int64, device=self.device)
        return bool(torch.isfinite(self.kv_cache.index_select(2, ids)).all())

    def clear_adapter(self, slot: int) -> None:
        self._layout = self._plans = None  # (write_adapter clears first)
        for layer in self.adapter_layers.values():
            layer.clear(slot)

    @torch.inference_mode()
    def write_prefix(self, prefix: torch.Tensor, blocks: list[int]) -> None:
        """prefix [L, 2, n, KVH, D]: an adapter's per-layer keys and values, into `blocks`."""
        ids = torch.tensor(blocks, dtype=torch.int64, device=self.device)
        self.ops.write_prefix(self.kv_cache, prefix.to(self.device, self.kv_cache.dtype), ids)

    @torch.inference_mode()
    def prefill_embeddings(self, embeddings: torch.Tensor, blocks: list[int]) -> None:
        """embeddings [n, hidden]: run virtual tokens at positions 0..n-1 through the base model, keeping
        only their K/V, which land in `blocks` (a prompt adapter's shared prefix)."""
        n, bs, dev = embeddings.shape[0], self.block_size, self.device
        step = build_step(
            kv_cache=self.kv_cache, ops=self.ops, slot_mapping=[blocks[p // bs] * bs + p % bs for p in range(n)],
            block_tables=[blocks], seq_lens=[n], query_starts=[0, n], adapters=None, device=dev,
            inputs=FreshInputs(dev),
        )
        with self.context.stepping(step):
            self.forward(inputs_embeds=embeddings.to(dev, self.model.dtype), positions=torch.arange(n, device=dev))


def _with_overflows(
    outcomes: list[tuple[Request, int | Exception]], chunks: list[ScheduledChunk], starts: list[int], hidden: torch.Tensor
) -> list[tuple[Request, int | Exception]]:
    """The rare path, checked exactly: `outcomes`, where every request with a row of `hidden` [T, hidden] that
    is not finite ends with `not_finite` instead."""
    rows = torch.isfinite(hidden).all(dim=-1).tolist()  # [T]
    failed = {c.request: not_finite(c.request) for c, s, e in zip(chunks, starts, starts[1:]) if not all(rows[s:e])}
    return [(r, o) for r, o in outcomes if r not in failed] + list(failed.items())


def _slot_of(chunk: ScheduledChunk) -> int:
    adapter = chunk.request.adapter
    return adapter.slot if adapter is not None else -1
