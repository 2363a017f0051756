"""The README's self-contained Python examples run as written (the blocks that start with `import`; the others
are fragments that use a model from the surrounding text)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
            if b.lstrip().startswith("import ")]


def test_readme_has_runnable_examples():
    assert _blocks(), "no self-contained ```python example in README.md"


@pytest.mark.parametrize("i", range(len(_blocks())))
def test_readme_example_runs(i):
    scope = {}
    exec(compile(_blocks()[i], f"README.md example {i}", "exec"), scope)  # noqa: S102 - our own README
    if "loss" in scope:
        assert scope["loss"].dim() == 0 and bool(scope["loss"].isfinite())
