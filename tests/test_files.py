"""Atomic writes (`weckd_jax.files`): the mode a plain open gives, and the output-path checks."""

import json
import os
import stat

import pytest

from weckd_jax import files


@pytest.mark.parametrize(
    "umask, mode",
    [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)],
    ids=["umask022", "umask002", "umask077"],
)
def test_written_files_get_the_mode_open_would_give(umask, mode, tmp_path):
    old = os.umask(umask)
    try:
        files.write_json(str(tmp_path / "results.json"), {"a": 1})
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "results.json").st_mode) == mode
    assert stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode) == mode


def test_write_text_replaces_atomically_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "report.md"
    files.write_text(str(path), "old")
    files.write_text(str(path), "new\n")
    assert path.read_text() == "new\n"
    assert os.listdir(tmp_path / "sub") == ["report.md"]
    files.write_json(str(path), [1.5])
    assert json.loads(path.read_text()) == [1.5]
    with pytest.raises(ValueError):  # NaN is no JSON: nothing is written, the file is kept
        files.write_json(str(path), [float("nan")])
    assert json.loads(path.read_text()) == [1.5] and os.listdir(tmp_path / "sub") == ["report.md"]


def test_output_problem(tmp_path):
    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    check = files.output_problem
    assert check(str(tmp_path / "new" / "b.json"), "--json") is None  # folders are created
    assert check(str(taken), "--json") == (
        f"--json {taken} already exists; choose another path, or add --overwrite to replace it"
    )
    assert check(str(taken), "--json", overwrite=True) is None
    assert (
        check(str(tmp_path), "--output")
        == f"--output {tmp_path} is a folder; name a file in it instead"
    )
    # A name ending in a separator names no file, whether or not the folder exists.
    assert check(str(tmp_path / "new") + "/", "--json", overwrite=True) == (
        f"--json {tmp_path / 'new'}/ ends in '/', so it names a folder, not a file; give a file "
        "name: drop the trailing '/', or add a file name after it"
    )
    assert check(str(taken / "b.json"), "--json") == (
        f"--json {taken / 'b.json'} cannot be written: {taken} is not a writable folder; "
        "choose another"
    )


@pytest.mark.parametrize("hard_links", [True, False], ids=["link", "no-hard-links"])
def test_write_text_without_replace_never_replaces_a_file(hard_links, tmp_path, monkeypatch):
    if not hard_links:  # a file system without hard links: the check-then-rename fallback

        def refuse(*args):
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "link", refuse)
    path = tmp_path / "config.json"
    files.write_json(str(path), {"run": 1}, replace=False)
    assert json.loads(path.read_text()) == {"run": 1}
    with pytest.raises(FileExistsError):
        files.write_json(str(path), {"run": 2}, replace=False)
    assert json.loads(path.read_text()) == {"run": 1}
    assert os.listdir(tmp_path) == ["config.json"]  # no temporary file left


def test_write_text_beside_takes_the_first_free_name(tmp_path):
    path = str(tmp_path / "bench.json")
    assert files.write_text_beside(path, "a") == path
    assert files.write_text_beside(path, "b") == str(tmp_path / "bench-1.json")
    assert files.write_text_beside(path, "c") == str(tmp_path / "bench-2.json")
    written = {name: (tmp_path / name).read_text() for name in os.listdir(tmp_path)}
    assert written == {"bench.json": "a", "bench-1.json": "b", "bench-2.json": "c"}


def test_write_output_keeps_a_file_that_appeared_and_says_where_the_output_went(tmp_path, capsys):
    path = tmp_path / "p.csv"
    assert files.write_output(str(path), "first\n", "--output", overwrite=False) == str(path)
    assert capsys.readouterr().err == ""
    written = files.write_output(str(path), "second\n", "--output", overwrite=False)
    assert written == str(tmp_path / "p-1.csv")
    assert path.read_text() == "first\n" and (tmp_path / "p-1.csv").read_text() == "second\n"
    assert capsys.readouterr().err == (
        f"warning: --output {path} appeared while this ran and was kept; wrote {written}\n"
    )
    assert files.write_output(str(path), "third\n", "--output", overwrite=True) == str(path)
    assert path.read_text() == "third\n"


def test_atomic_file_writes_bytes_and_keeps_the_old_file_on_an_error(tmp_path):
    path = tmp_path / "figure.png"
    with files.atomic_file(str(path), "wb") as f:
        f.write(b"\x89PNG old")
    failing = files.atomic_file(str(path), "wb", sync=False)
    with pytest.raises(RuntimeError, match="rendering failed"), failing as f:
        f.write(b"half")
        raise RuntimeError("rendering failed")
    assert path.read_bytes() == b"\x89PNG old"
    assert os.listdir(tmp_path) == ["figure.png"]


def test_write_text_beside_raises_when_the_folder_is_a_file(tmp_path):
    # os.makedirs raises FileExistsError for the folder, not for the name: every "-<n>" name
    # fails the same way, so trying the next one would never end.
    (tmp_path / "taken").write_text("a file where the folder should be")
    with pytest.raises(FileExistsError):
        files.write_text_beside(str(tmp_path / "taken" / "p.csv"), "x")
    assert os.listdir(tmp_path) == ["taken"]


def test_write_output_names_the_file_it_cannot_write(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("a file where a folder should be")
    path = blocker / "p.csv"
    with pytest.raises(files.OutputError) as error:
        files.write_output(str(path), "x\n", "--output", overwrite=False)
    assert str(error.value).startswith(f"--output {path} cannot be written (")
    assert str(error.value).endswith("); choose another path and run again")


def test_exclusive_folder_keeps_a_second_holder_out_and_removes_an_empty_folder_it_made(tmp_path):
    run = tmp_path / "run"
    with files.exclusive_folder(str(run)):
        assert run.is_dir()
        busy = pytest.raises(files.BusyError, match=f"^{run} is in use by another process")
        with busy, files.exclusive_folder(str(run)):  # a second open: as another process's
            pass
        (run / "config.json").write_text("{}")
    with files.exclusive_folder(str(run)):  # released when the block ended
        pass
    assert os.listdir(run) == ["config.json"]  # kept: not empty
    with files.exclusive_folder(str(tmp_path / "unused")):
        pass
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_load_json_names_a_damaged_file_with_the_fix_and_keeps_it(tmp_path):
    class Refused(Exception):
        pass

    path = tmp_path / "config.json"
    assert files.load_json(str(path), Refused, "FIX") is None  # no file: nothing to say
    path.write_text('{"seed": 0}')
    assert files.load_json(str(path), Refused, "FIX") == {"seed": 0}
    cases = {
        b'{"seed": 0, "da': "cannot be read as JSON (Unterminated string starting at: line 1 "
        "column 13 (char 12)): it was cut short (e.g. by a full disk or an interrupted copy) or "
        "edited",
        b"": "cannot be read as JSON (Expecting value: line 1 column 1 (char 0)): it was cut "
        "short (e.g. by a full disk or an interrupted copy) or edited",
        b"[1, 2]": "holds a JSON array, not the JSON object weckd_jax wrote: it was edited",
        b"null": "holds JSON null, not the JSON object weckd_jax wrote: it was edited",
    }
    for content, problem in cases.items():
        path.write_bytes(content)
        with pytest.raises(Refused) as e:
            files.load_json(str(path), Refused, "FIX")
        assert str(e.value) == f"{path} {problem}; FIX"
        assert path.read_bytes() == content
    path.unlink()
    path.mkdir()
    with pytest.raises(Refused) as e:
        files.load_json(str(path), Refused, "FIX")
    assert str(e.value) == f"{path} cannot be read (Is a directory); FIX"


def test_load_json_names_the_required_keys_a_record_lacks_and_keeps_it(tmp_path):
    # A record edited by hand, or written by a version that did not record a key its reader needs:
    # one line naming the file, the keys and the fix, not a KeyError where the key is read.
    class Refused(Exception):
        pass

    path = tmp_path / "results.json"
    path.write_text('{"links": [], "seed": 0}')
    assert files.load_json(str(path), Refused, "FIX", required=("links", "seed")) == {
        "links": [],
        "seed": 0,
    }
    with pytest.raises(Refused) as e:
        files.load_json(str(path), Refused, "FIX", required=("links", "data", "runtime"))
    assert str(e.value) == (
        f"{path} lacks 'data', 'runtime', which weckd_jax reads from it: it was edited, or "
        "written by another version of weckd_jax; FIX"
    )
    assert path.read_text() == '{"links": [], "seed": 0}'
