"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import importlib.abc
import sys

import pytest


class _RayImportBlocker(importlib.abc.MetaPathFinder):
    """Fails every ``import ray…`` while installed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "ray" or fullname.startswith("ray."):
            raise ImportError(
                f"the code under test imported {fullname!r}: no Ray work allowed here"
            )
        return None


@pytest.fixture
def no_ray():
    """Makes Ray unimportable for one test, whatever earlier tests imported.

    "Fails before any Ray work" is checked by making any ``import ray`` inside the code under
    test raise. Checking ``"ray" not in sys.modules`` instead only works when the unit tests run
    alone: in the full suite the integration tests (collected first) have imported Ray already.
    Job code imports Ray lazily inside functions, so hiding the modules is enough.
    """
    hidden = {
        name: sys.modules.pop(name)
        for name in list(sys.modules)
        if name == "ray" or name.startswith("ray.")
    }
    blocker = _RayImportBlocker()
    sys.meta_path.insert(0, blocker)
    try:
        yield
    finally:
        sys.meta_path.remove(blocker)
        for name in [n for n in sys.modules if n == "ray" or n.startswith("ray.")]:
            del sys.modules[name]
        sys.modules.update(hidden)
