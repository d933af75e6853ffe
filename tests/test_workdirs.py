"""What tells the folders of launch and tune apart."""

import ast
import os

from tests.conftest import REPO
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


def _docstrings(tree: ast.Module) -> set[ast.AST]:
    """The docstring nodes of ``tree``: of the module and of every class and function."""
    scopes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef))]
    return {
        scope.body[0].value
        for scope in scopes
        if scope.body
        and isinstance(scope.body[0], ast.Expr)
        and isinstance(scope.body[0].value, ast.Constant)
    }


def test_the_study_file_is_named_in_workdirs_only():
    # Launch, tune and predict tell a search's folder by this one name; a copy elsewhere could
    # drift from it. Docstrings may name it.
    assert workdirs.study_path("runs/s") == os.path.join("runs/s", "study.db")
    package = os.path.join(REPO, "weckd_jax")
    found = []
    for folder, _, names in os.walk(package):
        for name in names:
            path = os.path.join(folder, name)
            if not name.endswith(".py") or path == workdirs.__file__:
                continue
            with open(path) as f:
                tree = ast.parse(f.read())
            docstrings = _docstrings(tree)
            found += [
                f"{os.path.relpath(path, REPO)}:{node.lineno}"
                for node in ast.walk(tree)
                if isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and workdirs.STUDY_FILE in node.value
                and node not in docstrings
            ]
    assert found == []
