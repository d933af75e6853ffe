"""What tells the folders of launch and tune apart."""

from weckd_jax import workdirs


def test_seed_folders_are_found_by_seed_and_make_a_launch_run_sign(tmp_path):
    assert workdirs.seed_names(str(tmp_path)) == []
    assert workdirs.launch_run_sign(str(tmp_path)) is None
    for name in ("seed_10", "seed_2", "seed_x", "seeds"):
        (tmp_path / name).mkdir()
    (tmp_path / "seed_1").write_text("")  # a file, not a seed's run
    assert workdirs.seed_names(str(tmp_path)) == ["seed_2", "seed_10"]
    assert workdirs.seed_dir(str(tmp_path), 2) == str(tmp_path / "seed_2")
    assert workdirs.launch_run_sign(str(tmp_path)) == (
        "a multi-seed run of launch (its seed_2/ folder, one run per seed)"
    )
    (tmp_path / "checkpoints").mkdir()  # the single run's signs come first
    assert workdirs.launch_run_sign(str(tmp_path)) == "a run of launch (its checkpoints/ folder)"
    assert workdirs.seed_names(str(tmp_path / "seed_1")) == []  # not a folder
