"""The README's Python blocks run, in order, in one namespace, and its Quick start has the two commands."""

import re

import matplotlib
import pytest
from conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_quick_start_has_exactly_the_two_commands():
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^make \w+", quick.split("```sh", 1)[1].split("```", 1)[0], flags=re.M)
    assert commands == ["make run", "make test"]


@pytest.mark.slow
def test_python_blocks_run(capsys):
    matplotlib.use("Agg")
    namespace: dict = {}
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 4
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    out = capsys.readouterr().out
    assert "hand_wrong" in out and "['dense2']['W']" in out  # the planted mistake is found
    assert namespace["chain"].first_broken is None
