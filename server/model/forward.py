"""The serving forward of the supported families (Llama, Qwen2, Mistral), written as serving engines write it.

transformers loads the model and stays the reference the tests compare against; this forward runs the same
weights with fewer, larger ops over all of a step's tokens packed in one row ([T, hidden], see batch.py):
    x = norm(h);  qkv = x · [Wq; Wk; Wv]ᵀ            one GEMM (the three weights fused, biases too)
    q, k = rope(q, k)                                 tables gathered once per step for all layers
    store k, v in the paged cache; attend             the backend's ops, with the step's plan
    h += o_proj(attn)
    x = norm(h);  gate, up = x · [Wg; Wu]ᵀ            one GEMM
    h += down_proj(act(gate) · up)
Adapter deltas stay per projection: after a GEMM, each wrapped projection (`AdapterLinear`) adds its deltas
into its own columns of the output (LoRA on its input; bottleneck adapters, on o_proj and down_proj, on its
output). The fused weights are new tensors and the original projections' weights become views of them, so the
model's memory does not grow and its transformers forward still works.
Each norm adds the residual first (the block returns its output and the residual stream apart, as vLLM's layers
do), so that on the CPU in float32 the add and the norm are one C pass; there rope with the store of the new
keys and values, and SiLU(gate) · up, are one pass each too (quiver.kernels.native, cpu_layer.c), and the GEMMs
run on weights packed once in oneDNN's layout (quiver.kernels.packed_linear).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from quiver.kernels import native as cpu_kernels
from quiver.kernels import packed_linear
from quiver.model.batch import StepContext
from quiver.model.layers import AdapterLinear


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama/Qwen2/Mistral RMSNorm, op for op (fp32 statistics, scaled in the input dtype)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class _Norm:
    """An RMSNorm with the residual add before it: (norm(r), r) for r = residual + delta (delta alone when the
    residual is None), in one C pass when the step runs the CPU kernels (`native`)."""

    def __init__(self, norm: nn.Module) -> None:
        self.weight, self.eps = norm.weight, norm.variance_epsilon

    def __call__(
        self, delta: torch.Tensor, residual: torch.Tensor | None, native: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if native:
            return cpu_kernels.add_rms_norm(delta, residual, self.weight, self.eps)
        r = delta if residual is None else residual + delta
        return _rms_norm(r, self.weight, self.eps), r


class _Projection:
    """One GEMM for projections sharing an input (one or several), then each wrapped projection's adapter deltas
    into its own columns. Several: the fused weight [sum out, in] (and bias) is a new tensor and each projection's
    weight (and bias) becomes a view of its rows; one: its own weight."""

    def __init__(self, layers: list[nn.Module]) -> None:
        bases = [layer.base_layer if isinstance(layer, AdapterLinear) else layer for layer in layers]
        self.columns: list[tuple[AdapterLinear | None, int, int]] = []  # (its wrapper or None, first column, end)
        start = 0
        for layer, base in zip(layers, bases):
            self.columns.append((layer if isinstance(layer, AdapterLinear) else None, start, start + base.out_features))
            start += base.out_features
        # (wrapper, its columns of the output, or None for all of it: a view costs ~1 us a call)
        self.adapters = [(layer, None if len(bases) == 1 else slice(start, end)) for layer, start, end in self.columns
                         if layer is not None]
        if len(bases) == 1:  # nothing to fuse: the projection's own weight
            self.weight, self.bias = bases[0].weight, bases[0].bias
        else:
            with torch.no_grad():
                self.weight = torch.cat([b.weight for b in bases])
                self.bias = None
                if any(b.bias is not None for b in bases):
                    self.bias = torch.cat([b.bias if b.bias is not None else b.weight.new_zeros(b.out_features) for b in bases])
            for base, (_, start, end) in zip(bases, self.columns):
                base.weight = nn.Parameter(self.weight[start:end], requires_grad=False)
                if base.bias is not None:
                    base.bias = nn.Parameter(self.bias[start:end], requires_grad=False)
        self.packed = packed_linear.pack(self.weight, self.bias)  # float32 on the CPU: oneDNN's layout, else None

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        """x · Wᵀ + b: the projections' outputs side by side, without adapters."""
        return self.packed(x) if self.packed is not None else F.linear(x, self.weight, self.bias)

    def __call__(self, x: torch.Tensor, adapters: bool) -> torch.Tensor:
        """`adapters`: whether the step has any (without, the wrapped projections have nothing to add)."""
        y = self.gemm(x)
        for layer, columns in self.adapters if adapters else ():
            layer.add_delta(y if columns is None else y[:, columns], x)
        return y


class _Layer:
    """One decoder block's weights, fused, and its forward over a step's rows."""

    def __init__(self, block: nn.Module, config) -> None:
        attn, mlp = block.self_attn, block.mlp
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.index = attn.layer_idx
        self.norm_in = _Norm(block.input_layernorm)
        self.norm_post = _Norm(block.post_attention_layernorm)
        self.qkv = _Projection([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = _Projection([attn.o_proj])
        self.gate_up = _Projection([mlp.gate_proj, mlp.up_proj])
        self.down = _Projection([mlp.down_proj])
        self.silu = config.hidden_act == "silu"
        self.act = ACT2FN[config.hidden_act]
        self.intermediate = self.gate_up.columns[0][2]  # the gate's columns end where the up projection's begin

    def __call__(
        self, delta: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, step,
        native: bool, k_cache: torch.Tensor, v_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this block's output, the residual stream before it is added): the next norm adds them. k_cache, v_cache:
        this layer's of the step's cache."""
        t, d = delta.shape[0], self.head_dim
        adapters = step.adapters is not None
        x, residual = self.norm_in(delta, residual, native)
        qkv = self.qkv(x, adapters)  # [T, (H + 2 KVH) D]
        if native:  # rope and the store in one pass (bit for bit the torch ops below)
            q = cpu_kernels.rope_store(qkv, cos, sin, step.slot_mapping, k_cache, v_cache, heads=self.heads,
                                       kv_heads=self.kv_heads, dim=d)
        else:
            qk_end = (self.heads + self.kv_heads) * d
            qk = qkv[:, :qk_end].view(t, self.heads + self.kv_heads, d)
            # rope: x·cos + rotate_half(x)·sin, rotate_half(x) · sin = roll(x, D/2) · sin_signed (see
            # CompactDecoder); a product and a sum, not addcmul: its fused rounding moved the default model's
            # logits by up to 1e-4
            qk = qk * cos + qk.roll(d // 2, dims=-1) * sin
            q, k = qk[:, : self.heads], qk[:, self.heads :]
            v = qkv[:, qk_end:].view(t, self.kv_heads, d)
            step.ops.store_kv(k, v, k_cache, v_cache, step.slot_mapping)
        attn = step.ops.paged_attention(
            q, k_cache, v_cache, block_tables=step.block_tables, seq_lens=step.seq_lens,
            query_starts=step.query_starts, scale=self.scaling, plan=step.attention_plan,
        )
        x, residual = self.norm_post(self.o(attn.view(t, self.heads * d), adapters), residual, native)
        gate_up = self.gate_up(x, adapters)  # [T, 2 I]
        n = self.intermediate
        if native and self.silu:
            return self.down(cpu_kernels.silu_mul(gate_up, n), adapters), residual
        return self.down(self.act(gate_up[:, :n]) * gate_up[:, n:], adapters), residual


class CompactDecoder:
    """The decoder's forward over one step (the runner's `StepContext` holds it): hidden states [T, hidden] after
    the final norm, from token ids or embeddings [T] / [T, hidden] and positions [T]."""

    def __init__(self, model: PreTrainedModel, *, context: StepContext) -> None:
        decoder = model.get_decoder()
        self.embed_tokens = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.norm = _Norm(decoder.norm)
        self.layers = [_Layer(block, model.config) for block in decoder.layers]
        self.context = context
        self._caches: tuple[torch.Tensor | None, list] = (None, [])  # a cache and its layers' (K, V) views

    def _layer_caches(self, kv_cache: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(K, V)] of every layer, views of `kv_cache` [L, 2, ...] made once for it (indexing costs ~1.5 us)."""
        if self._caches[0] is not kv_cache:
            self._caches = kv_cache, [(kv_cache[layer.index, 0], kv_cache[layer.index, 1]) for layer in self.layers]
        return self._caches[1]

    def __call__(
        self, *, positions: torch.Tensor, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        step = self.context.step
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rotary(h[None], positions[None])  # [1, T, D] each, in h's dtype
        half = cos.shape[-1] // 2
        cos = cos[0, :, None, :]  # [T, 1, D]: every head of a row
        # rotate_half(x) = cat(-x2, x1) times sin equals roll(x, D/2) times sin with its first half negated
        sin = torch.cat((-sin[0, :, None, :half], sin[0, :, None, half:]), dim=-1)
        # float32 on the CPU with the torch backend: the layers' elementwise steps in C (quiver.kernels.native)
        native = step.ops.name == "torch" and cpu_kernels.takes_layer(h)
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, self._layer_caches(step.kv_cache)):
            h, residual = layer(h, residual, cos, sin, step, native, k_cache, v_cache)
        return self.norm(h, residual, native)[0]
