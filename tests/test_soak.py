"""A short soak (benchmarks/soak.py): 64 streaming clients over adapters of all six kinds with cancels and
short deadlines while adapters are uploaded, replaced and unloaded every second; everything accounted for,
nothing logged, the engine idle and resident memory steady at the end."""

from benchmarks.soak import SoakConfig, run


def test_short_soak(model_path, zoo, tmp_path):  # noqa: F811
    report = run(SoakConfig(seconds=15, clients=64, max_requests=3000), model_path=model_path, zoo=zoo, work=tmp_path)
    assert report.ok, report.problems
    assert report.requests >= 200 and report.outcomes.get("cancelled") and report.outcomes.get("completed")
    assert {"upload", "replace", "unload"} <= set(report.churn)
