"""AdapterLinear's slot stacks: what a slot holds after adapters of different ranks were written to it."""

import torch
from torch import nn

from quiver.kernels import TORCH_OPS
from quiver.model.batch import StepContext
from quiver.model.layers import AdapterLinear


def test_a_slot_rewritten_at_a_lower_rank_holds_the_new_factors_and_zeros_beyond():
    torch.manual_seed(0)
    layer = AdapterLinear(nn.Linear(16, 12), context=StepContext(), ops=TORCH_OPS, num_slots=3, max_rank=8, bottleneck_size=0)
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
