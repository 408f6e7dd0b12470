"""twotower_core stays pure (STYLE.md habit 1): torch and numpy only, no Ray, no file I/O."""

from __future__ import annotations

import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import twotower_core

CORE_DIR = Path(twotower_core.__file__).parent
FORBIDDEN_MODULES = ("ray", "pyarrow", "polars", "pandas")
# Ways a module could touch files: builtin open, pathlib, shutil, torch/numpy savers and loaders.
FILE_IO = re.compile(
    r"\bopen\(|\bpathlib\b|\bshutil\b|\btorch\.(save|load)\(|\bnp\.(load|save|savez|fromfile)\w*\(|"
    r"\bos\.(remove|rename|replace|makedirs|mkdir|listdir|walk)\(|\btempfile\b"
)


def core_modules() -> list[str]:
    return sorted(f"twotower_core.{m.name}" for m in pkgutil.iter_modules([str(CORE_DIR)]))


def test_core_modules_import_nothing_forbidden():
    modules = core_modules()
    assert "twotower_core.losses" in modules and "twotower_core.task" in modules
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN_MODULES!r})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=CORE_DIR.parent,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_core_sources_do_no_file_io():
    offenders = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted(CORE_DIR.glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if FILE_IO.search(line) and not line.lstrip().startswith("#")
    ]
    assert offenders == []


def test_the_io_pattern_catches_what_it_should():
    # The check above can fail: these lines would trip it.
    for line in (
        "with open(path) as f:",
        "from pathlib import Path",
        "torch.save(state, p)",
        "np.load(p)",
    ):
        assert FILE_IO.search(line), line
    assert not FILE_IO.search("scores.topk(k)")
