"""A short soak (tests/support/soak.py; its command line is benchmarks/soak.py): 64 streaming clients over
adapters of all six kinds with cancels and short deadlines, hostile requests and bad adapter uploads mixed in,
while adapters are uploaded, replaced and unloaded every second; everything accounted for, probes exact,
nothing logged, the engine idle and resident memory steady at the end."""

from tests.support.soak import SoakConfig, run


def test_short_soak(model_path, zoo, tmp_path):  # noqa: F811
    report = run(SoakConfig(seconds=15, clients=64, max_requests=3000), model_path=model_path, zoo=zoo, work=tmp_path)
    assert report.ok, report.problems
    assert report.requests >= 200 and report.outcomes.get("cancelled") and report.outcomes.get("completed")
    assert {"upload", "replace", "unload", "bad_upload"} <= set(report.churn)
    assert report.probes.get("exact") and {k.split(":")[0] for k in report.faults} == {"tiny_temperature", "bad_token"}
