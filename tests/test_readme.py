"""The README's code examples run as written."""

import os
import re

from tests.conftest import REPO


def test_losses_example_runs(capsys):
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Using the losses in your own JAX project") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "(16,)"
    assert out.startswith("loss ") and "'kd'" in out
