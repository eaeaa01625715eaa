"""AdapterLinear's slot stacks: what a slot holds after adapters of different ranks were written to it."""

import dataclasses

import torch
from torch import nn

from quiver.kernels import TORCH_OPS
from quiver.model.batch import StepContext
from quiver.model.layers import AdapterLinear, plan_layers


def test_a_slot_rewritten_at_a_lower_rank_holds_the_new_factors_and_zeros_beyond():
    torch.manual_seed(0)
    layer = AdapterLinear(nn.Linear(16, 12), context=StepContext(), index=0, ops=TORCH_OPS, num_slots=3, max_rank=8, bottleneck_size=0)
    neighbour = (torch.randn(8, 16), torch.randn(12, 8))
    layer.set_lora(2, a=neighbour[0], b=neighbour[1], scale=1.0)
    layer.set_lora(1, a=torch.randn(8, 16), b=torch.randn(12, 8), scale=2.0)
    a, b = torch.randn(3, 16), torch.randn(12, 3)
    layer.clear(1)
    layer.set_lora(1, a=a, b=b, scale=0.5)

    assert torch.equal(layer.lora_a[0, 1, :3], a) and torch.equal(layer.lora_b[1, :, :3], b)
    assert not layer.lora_a[0, 1, 3:].any() and not layer.lora_b[1, :, 3:].any()
    assert layer.lora_ranks.tolist() == [0, 3, 8] and layer.lora_scales.tolist() == [0.0, 0.5, 1.0]
    assert torch.equal(layer.lora_a[0, 2], neighbour[0]) and torch.equal(layer.lora_b[2], neighbour[1])
    assert layer.lora_slots == {1, 2}


def test_a_step_plans_once_per_distinct_ranks_not_per_layer():
    """plan_layers: layers whose present slots have the same ranks share one plan; a layer none of whose slots
    is present gets none (it skips the ops)."""
    context, calls = StepContext(), []

    def plan_lora(**metadata):
        calls.append(metadata["ranks"])
        return TORCH_OPS.plan_lora(**metadata)

    ops = dataclasses.replace(TORCH_OPS, plan_lora=plan_lora)
    layers = [AdapterLinear(nn.Linear(16, 12), context=context, index=i, ops=ops, num_slots=4, max_rank=8, bottleneck_size=0)
              for i in range(5)]
    for layer in layers[:3]:
        layer.set_lora(1, a=torch.randn(4, 16), b=torch.randn(12, 4), scale=1.0)
    layers[2].set_lora(3, a=torch.randn(8, 16), b=torch.randn(12, 8), scale=1.0)  # not in this step: same plan
    layers[3].set_lora(2, a=torch.randn(8, 16), b=torch.randn(12, 8), scale=1.0)
    lora_plans, bottleneck_plans = plan_layers(layers, ops=ops, seg_starts=[0, 2, 5], seg_slots=[1, 0],
                                               slots=frozenset({1, 0}), activations=frozenset(),
                                               device=torch.device("cpu"))
    assert len(calls) == 1 and lora_plans[0] is lora_plans[1] is lora_plans[2] is not None
    assert lora_plans[3] is None and lora_plans[4] is None and bottleneck_plans == ({},) * 5
