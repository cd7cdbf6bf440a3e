"""The examples in the modules' docstrings are run and must hold."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import churn

MODULES = sorted(m.name for m in pkgutil.iter_modules(churn.__path__) if m.name != "__main__")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"churn.{name}")
    failures, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failures == 0
