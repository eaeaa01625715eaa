"""Houlsby adapter tuning: a residual bottleneck MLP on the output of every block's `o_proj` and `down_proj`.

Each site computes `y = y + scaling · (up·act(down·y + b_d) + b_u)` (docs/adapters.md, BOTTLENECK), attached
with forward hooks so the base model's modules and names stay as they are. `up` starts at zero, so the
adapted model starts exactly equal to the base model (near-identity initialisation).
"""

import torch
from torch import nn

from quiver.adapters.peft_layout import DECODER_LAYERS
from quiver.adapters.weights import ACTIVATIONS, BOTTLENECK_SITES, BottleneckSite, BottleneckWeights


class BottleneckAdapter(nn.Module):
    def __init__(self, *, hidden: int, size: int, non_linearity: str, scaling: float) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, size)  # weight [size, hidden]; PyTorch's default init
        self.up = nn.Linear(size, hidden)  # weight [hidden, size]; zero
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        nn.init.zeros_(self.down.bias)
        self.act = ACTIVATIONS[non_linearity]
        self.scaling = scaling

    def forward(self, y: torch.Tensor) -> torch.Tensor:  # y [..., hidden]
        return y + self.scaling * self.up(self.act(self.down(y)))

    def site(self) -> BottleneckSite:
        return BottleneckSite(
            down=self.down.weight.detach().clone(), down_bias=self.down.bias.detach().clone(),
            up=self.up.weight.detach().clone(), up_bias=self.up.bias.detach().clone(),
        )


class Bottlenecks(nn.Module):
    """One adapter per site of every decoder block of `model`, hooked onto the model (which stays frozen)."""

    def __init__(self, model: nn.Module, *, size: int, non_linearity: str, scaling: float = 1.0) -> None:
        super().__init__()
        hidden = model.config.get_text_config().hidden_size
        self.names = [
            f"{DECODER_LAYERS}.{layer}.{module}"
            for layer in range(model.config.get_text_config().num_hidden_layers)
            for module in BOTTLENECK_SITES.values()
        ]
        self.adapters = nn.ModuleList(
            BottleneckAdapter(hidden=hidden, size=size, non_linearity=non_linearity, scaling=scaling) for _ in self.names
        )
        self.non_linearity = non_linearity
        self.scaling = scaling
        for name, adapter in zip(self.names, self.adapters):
            model.get_submodule(name).register_forward_hook(lambda _module, _inputs, y, adapter=adapter: adapter(y))

    def weights(self) -> BottleneckWeights:
        sites = {name: adapter.site() for name, adapter in zip(self.names, self.adapters)}
        return BottleneckWeights(sites=sites, non_linearity=self.non_linearity, scaling=self.scaling)
