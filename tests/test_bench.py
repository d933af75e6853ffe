"""The benchmark runs and reports every figure (speed targets are read, not asserted, here)."""

from tests.conftest import smoke_config
from weckd_jax import bench


def test_bench_reports_every_figure():
    result = bench.run(smoke_config(), repeats=1, steps=1)
    assert set(result["train_step"]) == {"supervised", "kd", "kd_at", "kd_at_cached"}
    for name, row in result["train_step"].items():
        assert row["images_per_s"] > 0 and row["step_ms"] > 0
        assert result["compile_seconds"][name] > 0
        assert result["gflops_per_s"][name] > 0
    assert result["eval"]["images_per_s"] > 0 and result["pipeline"]["images_per_s"] > 0
    assert result["peak_rss_mb"] > 0 and "cpu" in result["device"]
    ratio = result["ratios"]["kd_over_supervised"]
    assert (
        ratio
        == result["train_step"]["kd"]["step_ms"] / result["train_step"]["supervised"]["step_ms"]
    )
