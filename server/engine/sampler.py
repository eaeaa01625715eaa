"""Pick each request's next token with its own parameters and its own random generator.

A request's generator is seeded once from its seed (or from the OS when it has none) and used only for
that request, so its tokens do not depend on what else is in the batch.

A failure of one row ends that request alone: a row holding a logit that is not finite (an adapter whose
activations overflowed) gives `not_finite(request)` instead of a token, and so does anything raised while
drawing its token (a bug, logged).
"""

import logging
import secrets

import torch

from quiver.engine.request import Request, SamplingParams
from quiver.errors import FailedPrecondition
from quiver.kernels import native

log = logging.getLogger(__name__)

# temperatures are used within float32's normal range: dividing by one that rounds to 0 or inf would give NaN
_MIN_TEMPERATURE = torch.finfo(torch.float32).tiny
_MAX_TEMPERATURE = torch.finfo(torch.float32).max


class Sampler:
    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int | Exception]:
        """logits [B, V] float32, row i for requests[i] -> per request its next token id, or the error that
        ends it (see the module docstring). Finiteness is checked for the whole batch at once (with the greedy
        picks, in one pass over the logits, on the CPU in float32: quiver.kernels.native)."""
        picked = native.greedy_rows(logits)
        if picked is None:
            return self.pick(logits, requests, finite_rows(logits))
        return self._tokens(logits, requests, *picked)

    def pick(self, logits: torch.Tensor, requests: list[Request], finite: torch.Tensor) -> list[int | Exception]:
        """Like `sample`, where `finite` [B] says which rows were finite before some of their tokens were masked
        to -inf (penalties.py): those rows are picked from, the others end their requests."""
        return self._tokens(logits, requests, logits.argmax(dim=-1), finite)

    def _tokens(
        self, logits: torch.Tensor, requests: list[Request], best: torch.Tensor, finite: torch.Tensor
    ) -> list[int | Exception]:
        """Each request's token: its greedy pick `best`, or one drawn from its row; its row not `finite`: the error."""
        tokens: list = best.masked_fill_(~finite, -1).tolist()
        for i, request in enumerate(requests):
            if tokens[i] < 0:
                tokens[i] = not_finite(request)
            elif not request.params.greedy:
                try:
                    tokens[i] = self._draw(logits[i], request)
                except Exception as error:
                    log.exception("sampling request %r failed; ending it alone", request.request_id)
                    tokens[i] = error
        return tokens

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _draw(self, logits: torch.Tensor, request: Request) -> int:
        """logits [V], all finite -> a token drawn from softmax((logits - max) / T) restricted to top-k and
        top-p. The top token's logit is 0 and the others' at most 0 (-inf if they overflow), so no row is NaN."""
        params = request.params
        logits = logits.cpu()
        logits = (logits - logits.max()) / temperature_of(params)
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
            seed = request.params.seed if request.params.seed is not None else secrets.randbits(64)
            g = torch.Generator().manual_seed(seed)
            self._generators[request.request_id] = g
        return g


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> [B] bool: whether each row is all finite."""
    finite = logits.sum(dim=-1).isfinite()  # cheap, and also false where a huge row's sum overflows
    if not finite.all():
        finite = torch.isfinite(logits).all(dim=-1)  # exact, on the rare path
    return finite


def temperature_of(params: SamplingParams) -> float:
    """The temperature a request's logits are divided by: 1 when greedy, else held within float32's normal range."""
    return min(max(params.temperature, _MIN_TEMPERATURE), _MAX_TEMPERATURE) if not params.greedy else 1.0


def not_finite(request: Request) -> FailedPrecondition:
    """The error that ends a request whose activations or logits were not finite."""
    source = f"adapter {request.kv_adapter[0]!r}" if request.kv_adapter is not None else "the base model"
    return FailedPrecondition(
        f"the output of {source} was not finite for this request (its activations overflowed), so it was ended"
    )
