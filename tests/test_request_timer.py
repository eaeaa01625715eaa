"""A call's time per output token is paced by its samples side by side: n samples of k tokens each, produced
over the same steps, give the step time, not the step time / n."""

from quiver.metrics import Metrics, NoAdapter


def test_time_per_output_token_of_n_samples_is_the_time_between_steps(monkeypatch):
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr("quiver.metrics.time.perf_counter", lambda: next(clock))
    metrics = Metrics()
    timer = metrics.request(NoAdapter.BASE)  # t = 0
    for _ in range(5):  # five steps, one second apart: each gives both samples a token
        timer.tokens(1, index=0)
        timer.tokens(1, index=1)
    timer.finished("OK")
    # first token at t = 1, last at t = 10: 9 s over the 4 intervals between one sample's 5 tokens
    tpot = metrics.registry.get_sample_value("quiver_time_per_output_token_seconds_sum", {"adapter_kind": "base"})
    assert tpot == 9 / 4
    assert metrics.registry.get_sample_value("quiver_generation_tokens_total", {"adapter_kind": "base"}) == 10
