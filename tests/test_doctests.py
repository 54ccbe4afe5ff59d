"""The examples in docstrings run and print what they show."""

import doctest
import importlib
from pathlib import Path

import pytest

import attnlab

SRC = Path(attnlab.__file__).parent
MODULES = sorted(
    ".".join(p.relative_to(SRC.parent).with_suffix("").parts)
    for p in SRC.rglob("*.py")
    if ">>> " in p.read_text(encoding="utf-8")
)


def test_some_modules_have_examples():
    assert MODULES, "no docstring examples found"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
