"""Every ```python block of README.md and docs/*.md runs, as written, in a fresh process.

A block runs in a temporary folder with this run's KERAS_BACKEND. A block that sets
`os.environ["KERAS_BACKEND"]` to another backend is skipped on this one (it runs on its
own). A block preceded by `<!-- not run: reason -->` is skipped with that reason.
"""

import glob
import os
import re
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = keras.backend.backend()
TIMEOUT_S = 120

BLOCK = re.compile(
    r"(?:^<!--\s*not run:\s*(?P<reason>.*?)\s*-->\n)?^```python\n(?P<code>.*?)^```", re.S | re.M
)
OTHER_BACKEND = re.compile(r'os\.environ\["KERAS_BACKEND"\] = "(\w+)"')


def documents():
    paths = [os.path.join(ROOT, "README.md")] + sorted(
        glob.glob(os.path.join(ROOT, "docs", "*.md"))
    )
    return [path for path in paths if os.path.exists(path)]


def blocks():
    found = []
    for path in documents():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start("code"))
            name = f"{os.path.relpath(path, ROOT)}:{line}"
            found.append(pytest.param(match.group("code"), match.group("reason"), id=name))
    return found


def test_the_docs_have_python_blocks():
    assert len(blocks()) >= 5


@pytest.mark.parametrize("code, reason", blocks())
def test_doc_block_runs(code, reason, tmp_path):
    if BACKEND != "jax":
        # Most blocks leave the backend to the environment; one backend's run is enough
        # to keep the suite within CI's time (the layers' behaviour on every backend is
        # what the rest of the suite checks).
        pytest.skip("the docs' blocks run in the jax backend's test run")
    if reason:
        pytest.skip(f"not run: {reason}")
    wanted = OTHER_BACKEND.search(code)
    if wanted and wanted.group(1) != BACKEND:
        pytest.skip(f"written for the {wanted.group(1)} backend")
    (tmp_path / "block.py").write_text(code)
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "PYTHONPATH": ROOT, "MPLBACKEND": "Agg"}
    process = subprocess.run(
        [sys.executable, "block.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
