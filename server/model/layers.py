"""The multi-adapter wrapper around a target `nn.Linear`: the frozen base GEMM plus each token's own delta.

    y = base(x)
    y[seg] += scale[w] · (x[seg] · A[w]ᵀ) · B[w]ᵀ                      LoRA, on the layer's input
    y[seg] += scale[w] · (U[w] · act(D[w] · y[seg] + b_d[w]) + b_u[w])   bottleneck, on its output

for each segment `seg` of tokens whose adapter sits in slot w (see `AdapterBatch`). Adapter weights live
in per-slot stacks padded to the maximum rank; each adapter is computed at its own rank by the kernels,
and a slot whose adapter does not touch this layer has rank 0 here, which costs nothing. The layers read
the current step (segments and the backend's plans, built once per step by `plan_layers`) from the runner's
`StepContext`.
"""

import operator

import torch
from torch import nn

from quiver.kernels import KernelOps
from quiver.kernels.ops import ACTIVATIONS
from quiver.model.batch import AdapterBatch, StepContext


class AdapterLinear(nn.Module):
    def __init__(
        self,
        base_layer: nn.Linear,
        *,
        context: StepContext,
        index: int,  # this layer's position among the runner's adapter layers: its entry in a step's plans
        ops: KernelOps,
        num_slots: int,
        max_rank: int,
        bottleneck_size: int,  # 0: this layer takes no bottleneck adapter
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.index = index
        self.ops = ops
        w = base_layer.weight
        din, dout, dt, dev = base_layer.in_features, base_layer.out_features, w.dtype, w.device
        # the per-slot stacks: plain attributes, not buffers (a step reads each of them ~100 times, and a buffer's
        # read goes through nn.Module.__getattr__); they stay on the device the wrapper is built on
        self.lora_a = torch.zeros(1, num_slots, max_rank, din, dtype=dt, device=dev)  # [1, S, R, in]
        self.lora_b = torch.zeros(num_slots, dout, max_rank, dtype=dt, device=dev)  # [S, out, R]
        self.lora_ranks = torch.zeros(num_slots, dtype=torch.int32, device=dev)  # [S]
        self.lora_scales = torch.zeros(num_slots, dtype=torch.float32, device=dev)  # [S]
        self.out_offsets = torch.tensor([0, dout], dtype=torch.int32, device=dev)  # [2]
        # slots with weights on this layer, mirrored on the host: a step none of whose slots has any skips the ops
        # here (e.g. q/v-only LoRA adapters leave the other five projections alone, with no launch and no sync)
        self.lora_slots: set[int] = set()
        self.bn_slots: set[int] = set()
        self.lora_rank_of = [0] * num_slots  # lora_ranks and bottleneck sizes mirrored on the host, for the step's plans
        self.bn_size_of = [0] * num_slots
        self.bottleneck_size = bottleneck_size
        if bottleneck_size:
            bn = bottleneck_size
            self.bn_down = torch.zeros(1, num_slots, bn, dout, dtype=dt, device=dev)  # [1, S, bn, out]
            self.bn_down_bias = torch.zeros(num_slots, bn, dtype=dt, device=dev)  # [S, bn]
            self.bn_up = torch.zeros(num_slots, dout, bn, dtype=dt, device=dev)  # [S, out, bn]
            self.bn_up_bias = torch.zeros(num_slots, dout, dtype=dt, device=dev)  # [S, out]
            self.bn_scales = torch.zeros(num_slots, dtype=torch.float32, device=dev)  # [S]
            self.bn_activation: list[str | None] = [None] * num_slots
            # by non-linearity [S]: a slot's bottleneck size where its adapter uses it, else 0 (the `ranks` its ops read)
            self.bn_sizes_by_act = {act: torch.zeros(num_slots, dtype=torch.int32, device=dev) for act in ACTIVATIONS}

    def stacks(self) -> list[torch.Tensor]:
        """Every per-slot tensor this wrapper holds (what its slots cost in memory)."""
        names = ["lora_a", "lora_b", "lora_ranks", "lora_scales"]
        if self.bottleneck_size:
            names += ["bn_down", "bn_down_bias", "bn_up", "bn_up_bias", "bn_scales"]
        return [getattr(self, name) for name in names] + list(getattr(self, "bn_sizes_by_act", {}).values())

    # ---- slot management (engine thread, between steps) ---------------------------------------------

    def set_lora(self, slot: int, *, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """a [r, in], b [out, r]: this layer's LoRA factors for the adapter in `slot`."""
        r = a.shape[0]
        if r > self.lora_a.shape[2]:
            raise ValueError(f"rank {r} exceeds the configured maximum LoRA rank {self.lora_a.shape[2]}")
        self.lora_a[0, slot, :r] = a
        self.lora_b[slot, :, :r] = b
        self.lora_a[0, slot, r:].zero_()  # beyond the rank: zeros, not the slot's previous adapter
        self.lora_b[slot, :, r:].zero_()
        self.lora_ranks[slot] = r
        self.lora_scales[slot] = scale
        self.lora_rank_of[slot] = r
        self.lora_slots.add(slot)

    def set_bottleneck(
        self, slot: int, *, down: torch.Tensor, down_bias: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor,
        scale: float, activation: str,
    ) -> None:
        """down [bn, out], down_bias [bn], up [out, bn], up_bias [out]: a bottleneck on this layer's output."""
        bn = down.shape[0]
        if bn > self.bottleneck_size:
            raise ValueError(f"bottleneck size {bn} exceeds the configured maximum {self.bottleneck_size}")
        self.bn_down[0, slot, :bn] = down
        self.bn_down_bias[slot, :bn] = down_bias
        self.bn_up[slot, :, :bn] = up
        self.bn_up_bias[slot] = up_bias * scale  # the expand op adds its bias unscaled
        self.bn_scales[slot] = scale
        self.bn_activation[slot] = activation
        for act, sizes in self.bn_sizes_by_act.items():
            sizes[slot] = bn if act == activation else 0
        self.bn_size_of[slot] = bn
        self.bn_slots.add(slot)

    def clear(self, slot: int) -> None:
        """Forget whatever adapter `slot` held here (rank 0: the kernels skip it)."""
        self.lora_ranks[slot] = 0
        self.lora_rank_of[slot] = self.bn_size_of[slot] = 0
        self.lora_slots.discard(slot)
        self.bn_slots.discard(slot)
        if self.bottleneck_size:
            self.bn_activation[slot] = None
            for sizes in self.bn_sizes_by_act.values():
                sizes[slot] = 0

    # ---- forward ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        self.add_delta(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]))
        return y

    def add_delta(self, y2: torch.Tensor, x2: torch.Tensor) -> None:
        """y2 [T, out] (rows contiguous; e.g. this projection's columns of a fused GEMM's output) += the step's
        adapter deltas for the layer's input x2 [T, in]; nothing when no slot of the step has weights here."""
        step = self.context.step
        batch = step.adapters if step is not None else None
        if batch is None:
            return
        if not self.lora_slots.isdisjoint(batch.slots):
            self.ops.lora_apply(y2, x2, self.lora_a, self.lora_b, out_offsets=self.out_offsets, seg_starts=batch.seg_starts,
                                seg_slots=batch.seg_slots, ranks=self.lora_ranks, scales=self.lora_scales,
                                plan=batch.lora_plans[self.index])
        if self.bottleneck_size and batch.activations and not self.bn_slots.isdisjoint(batch.slots):
            self._bottleneck(y2, batch)

    def _bottleneck(self, y2: torch.Tensor, batch: AdapterBatch) -> None:
        # in place (ops.BottleneckApply reads a row whole before adding to it): one call per non-linearity present,
        # whose rows no other call touches (other slots count as size 0 there)
        for act in batch.activations:
            self.ops.bottleneck_apply(
                y2, y2, self.bn_down, self.bn_up, seg_starts=batch.seg_starts, seg_slots=batch.seg_slots,
                sizes=self.bn_sizes_by_act[act], scales=self.bn_scales, down_bias=self.bn_down_bias,
                up_bias=self.bn_up_bias, activation=act, plan=batch.bottleneck_plans[self.index][act],
            )

    def bottleneck_sizes_of(self, act: str) -> list[int]:
        """The host mirror of the `ranks` its bottleneck ops take for non-linearity `act`: other slots count as 0."""
        return [n if a == act else 0 for n, a in zip(self.bn_size_of, self.bn_activation)]


def plan_layers(
    layers: list[AdapterLinear], *, ops: KernelOps, seg_starts: list[int], seg_slots: list[int],
    slots: frozenset[int], activations: frozenset[str], device: torch.device,
) -> tuple[tuple[object | None, ...], tuple[dict[str, object | None], ...]]:
    """Every layer's `ops.plan_lora` for this step's segments, its LoRA ops' and (by activation) its bottleneck
    ops': (lora_plans, bottleneck_plans), indexed by layer index. A layer runs the ops when it holds weights of
    one of `slots` (`AdapterBatch.slots`: the step's, or in a padded step every loaded adapter's), as
    `AdapterLinear.add_delta` decides; layers whose present slots have the same ranks share one plan (built once);
    a layer that skips the ops this step gets None / {}."""
    present = sorted({w for w in seg_slots if w >= 0})
    ranks_of_present = operator.itemgetter(*present, present[0]) if present else lambda ranks: ()  # always a tuple
    plans: dict[tuple[int, ...], object | None] = {}  # by the ranks of the present slots

    def plan_of(ranks: list[int]) -> object | None:
        key = ranks_of_present(ranks)
        if key not in plans:
            plans[key] = ops.plan_lora(seg_starts=seg_starts, seg_slots=seg_slots, ranks=ranks, device=device)
        return plans[key]

    lora_plans, bottleneck_plans = [], []
    for layer in layers:
        uses_lora = not layer.lora_slots.isdisjoint(slots)
        lora_plans.append(plan_of(layer.lora_rank_of) if uses_lora else None)
        uses_bottleneck = layer.bottleneck_size and not layer.bn_slots.isdisjoint(slots)
        bottleneck_plans.append({act: plan_of(layer.bottleneck_sizes_of(act)) for act in activations} if uses_bottleneck else {})
    return tuple(lora_plans), tuple(bottleneck_plans)


def install_adapter_layers(
    model: nn.Module, *, context: StepContext, ops: KernelOps, num_slots: int, max_rank: int, bottleneck_size: int,
    bottleneck_sites: frozenset[str],  # leaf names inside a block that take bottlenecks, e.g. "mlp.down_proj"
) -> dict[str, AdapterLinear]:
    """Wrap every `nn.Linear` of the decoder layers in place; returns the wrappers by full module name,
    e.g. "model.layers.3.self_attn.q_proj"."""
    decoder_layers = model.get_decoder().layers
    prefix = next(name for name, module in model.named_modules() if module is decoder_layers)
    wrapped: dict[str, AdapterLinear] = {}  # in index order
    for i, block in enumerate(decoder_layers):
        _unwrap(block)  # a model an earlier runner served: its wrappers give way to this runner's
        for name, module in list(block.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            layer = AdapterLinear(
                module, context=context, index=len(wrapped), ops=ops, num_slots=num_slots, max_rank=max_rank,
                bottleneck_size=bottleneck_size if name in bottleneck_sites else 0,
            )
            setattr(parent, attr, layer)
            wrapped[f"{prefix}.{i}.{name}"] = layer
    return wrapped


def _unwrap(block: nn.Module) -> None:
    """Put back the plain `nn.Linear` of every `AdapterLinear` in `block`."""
    for name, module in list(block.named_modules()):
        if isinstance(module, AdapterLinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, attr, module.base_layer)
