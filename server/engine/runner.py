"""Build one step's batch tensors, run the frozen model once over all scheduled tokens, sample.

Logits are computed only for the rows that are sampled (the last row of each chunk that reaches the end
of its request's known tokens).
"""

import torch
from transformers import PreTrainedModel

from kernels import KernelOps
from server.engine.request import Request
from server.engine.sampler import Sampler
from server.engine.scheduler import ScheduledChunk
from server.model.batch import StepBatch


def kv_cache_shape(model: PreTrainedModel, *, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """[L, 2, NB, BS, KVH, D] for this model's attention layers."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return (cfg.num_hidden_layers, 2, num_blocks, block_size, kv_heads, head_dim)


class ModelRunner:
    def __init__(self, model: PreTrainedModel, *, ops: KernelOps, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.ops = ops
        self.device = model.device
        self.block_size = block_size
        shape = kv_cache_shape(model, num_blocks=num_blocks, block_size=block_size)
        self.kv_cache = torch.zeros(shape, dtype=model.dtype, device=self.device)  # [L, 2, NB, BS, KVH, D]
        self.sampler = Sampler()

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> list[int]:
        """Run the chunks; return the next token of each chunk whose `samples` is true, in order."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        sample_rows: list[int] = []
        sampled: list[Request] = []
        bs = self.block_size
        for chunk in chunks:
            request, begin = chunk.request, chunk.request.num_computed_tokens
            end = begin + chunk.num_tokens
            input_ids += request.all_token_ids[begin:end]
            positions += range(begin, end)
            table = request.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(begin, end)]
            starts.append(starts[-1] + chunk.num_tokens)
            if chunk.samples:
                sample_rows.append(starts[-1] - 1)
                sampled.append(request)
        max_blocks = max(len(c.request.block_table) for c in chunks)
        tables = [c.request.block_table + [0] * (max_blocks - len(c.request.block_table)) for c in chunks]
        dev = self.device
        batch = StepBatch(
            kv_cache=self.kv_cache,
            ops=self.ops,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([c.request.num_computed_tokens + c.num_tokens for c in chunks], dtype=torch.int32, device=dev),
            query_starts=torch.tensor(starts, dtype=torch.int32, device=dev),
        )
        hidden = self.decoder(
            input_ids=torch.tensor([input_ids], device=dev),
            position_ids=torch.tensor([positions], device=dev),
            use_cache=False,
            quiver_batch=batch,
        ).last_hidden_state[0]  # [T, hidden]
        if not sampled:
            return []
        logits = self.lm_head(hidden[sample_rows]).float()  # [B_sampled, V]
        return self.sampler.sample(logits, sampled)
