"""Pick each request's next token with its own parameters and its own random generator.

A request's generator is seeded once from its seed (or from the OS when it has none) and used only for
that request, so its tokens do not depend on what else is in the batch.
"""

import secrets

import torch

from server.engine.request import Request


class Sampler:
    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """logits [B, V] float32, row i for requests[i] -> one token id per request."""
        tokens = logits.argmax(dim=-1).tolist()
        for i, request in enumerate(requests):
            if not request.params.greedy:
                tokens[i] = self._draw(logits[i], request)
        return tokens

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _draw(self, logits: torch.Tensor, request: Request) -> int:
        """logits [V] -> a token drawn from softmax(logits / T) restricted to top-k and top-p."""
        params = request.params
        logits = logits.cpu() / params.temperature
        if 0 < params.top_k < logits.shape[-1]:
            kth = torch.topk(logits, params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
            sorted_probs[before >= params.top_p] = 0.0  # always keeps the most likely token
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self._generator(request)))

    def _generator(self, request: Request) -> torch.Generator:
        g = self._generators.get(request.request_id)
        if g is None:
            seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
            g = torch.Generator().manual_seed(seed)
            self._generators[request.request_id] = g
        return g
