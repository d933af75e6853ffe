"""The benchmark runs and reports every figure (speed targets are read, not asserted, here)."""

import json
import os
import subprocess
import textwrap

from tests.conftest import REPO, run_python

SMOKE = os.path.join(REPO, "configs", "smoke.py")


def test_bench_reports_every_figure(tmp_path):
    # Through the command line, over an existing --json file that --overwrite allows replacing.
    path = tmp_path / "bench.json"
    path.write_text('{"keep": 1}')
    out = _bench_cli("--repeats=1", "--steps=1", f"--json={path}", "--overwrite")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(path.read_text())
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
    assert "train kd_at" in out.stdout and "input pipeline" in out.stdout


FLOPS_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    from jax.sharding import Mesh
    from weckd_jax import bench, parallel, train

    spec = train.ModelSpec("resnet10", num_classes=5, width=8, stem="small")
    cfg = train.StepConfig()
    hp = dict(learning_rate=1e-2, weight_decay=1e-4, warmup_steps=0, total_steps=3, alpha=0.5,
              beta=1.0, t_max=4.0, t_min=2.0)
    batch = {"image": np.zeros((16, 32, 32, 3), np.uint8), "label": np.zeros(16, np.int32),
             "label_mask": np.ones(16, np.float32)}
    flops = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = Mesh(np.asarray(devices), ("data",))
        state = parallel.replicate(
            train.init_state(spec, cfg, jax.random.key(0), (32, 32, 3), hp), mesh)
        step = train.make_train_step(spec, (), cfg, mesh)
        compiled = step.lower(
            state, (), parallel.global_batch(batch, mesh), jax.random.key(1)).compile()
        flops.append(bench.step_flops(compiled, mesh))
    print("FLOPS", *flops)
    """
)


def test_gflops_count_the_whole_global_batch_on_eight_devices():
    out = run_python("-c", FLOPS_SCRIPT, timeout=900, devices=8)
    assert out.returncode == 0, out.stderr[-3000:]
    one, eight = (float(v) for v in out.stdout.split("FLOPS")[1].split())
    # The same global batch: the same arithmetic, up to the cross-device reductions' few adds.
    assert one > 0 and abs(eight / one - 1) < 0.1, (one, eight)


def _bench_cli(*args: str) -> subprocess.CompletedProcess:
    return run_python("-m", "weckd_jax.bench", "--config", SMOKE, *args, timeout=300)


def test_bench_command_line_mistakes_end_without_a_traceback(tmp_path):
    taken = tmp_path / "results.json"
    taken.write_text('{"keep": 1}')
    cases = {
        ("--config.model.widht=8",): "unknown config key",
        ("--config.train.batch_size=0",): "batch_size",
        ("--repeats=0",): "repeats",
        (f"--json={tmp_path}",): "is a folder",
        (f"--json={taken}",): f"--json {taken} already exists; choose another path, or add "
        "--overwrite",
    }
    for args, message in cases.items():
        out = _bench_cli(*args)
        assert out.returncode != 0 and message in out.stderr, (args, out.stderr[-2000:])
        assert "Traceback" not in out.stderr, (args, out.stderr[-2000:])
    assert taken.read_text() == '{"keep": 1}'  # refused before any timing, left as it was
    # Without --config, ml_collections applies overrides to the default as the flag is defined.
    bare = run_python("-m", "weckd_jax.bench", "--config.trian.x=1", timeout=300)
    assert bare.returncode == 2 and "did you mean 'train'?" in bare.stderr, bare.stderr[-2000:]
    assert "Traceback" not in bare.stderr
