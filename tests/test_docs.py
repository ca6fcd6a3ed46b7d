"""Every ```python block of README.md and docs/*.md runs, as written.

A block runs in a temporary folder with this run's KERAS_BACKEND, in a fresh namespace, after
`keras.backend.clear_session()`, in a Python process that the blocks share (one per pytest
worker): importing Keras and the backend, and the first trace and compile in a process, cost
more than most blocks do themselves. A block that sets process-wide state (`os.environ`,
`keras.config.set_*`) or needs to be `__main__` (multiprocessing) runs in a fresh process of its
own. A block that sets `os.environ["KERAS_BACKEND"]` to another backend is skipped on this one (it
runs on its own). A block preceded by `<!-- not run: reason -->` is skipped with that reason.

The shared process is this file run as a script: it reads one JSON request a line, `{"code",
"cwd"}`, on stdin and answers `{"ok", "output"}` a line.
"""

import contextlib
import glob
import io
import json
import os
import re
import select
import subprocess
import sys
import traceback
import warnings

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = keras.backend.backend()
TIMEOUT_S = 120

BLOCK = re.compile(
    r"(?:^<!--\s*not run:\s*(?P<reason>.*?)\s*-->\n)?^```python\n(?P<code>.*?)^```", re.S | re.M
)
OTHER_BACKEND = re.compile(r'os\.environ\["KERAS_BACKEND"\] = "(\w+)"')
NEEDS_OWN_PROCESS = re.compile(r"os\.environ|keras\.config\.set_|__main__")
# The scheduler's warnings that a run did not follow its schedule fail a block: an example
# that sets them off shows a user a recipe that does not work as written. (A block that
# shows one on purpose catches it.)
OFF_SCHEDULE = ("SparsityScheduler: when the schedule ended", "SparsityScheduler: training stopped")


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


def environment():
    return {**os.environ, "KERAS_BACKEND": BACKEND, "PYTHONPATH": ROOT, "MPLBACKEND": "Agg"}


class SharedProcess:
    """The process that runs the blocks one after the other (`serve()`, below)."""

    def __init__(self, log_path):
        self.log_path = log_path
        self.process = None

    def run(self, code, cwd):
        if self.process is None or self.process.poll() is not None:
            self.log = open(self.log_path, "a")  # the process's own stderr: C++ logs, crashes
            self.process = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.log,
                env=environment(),
                text=True,
            )
        self.process.stdin.write(json.dumps({"code": code, "cwd": str(cwd)}) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], TIMEOUT_S)
        answer = self.process.stdout.readline() if ready else ""
        if not answer:  # timed out or died: the next block gets a new process
            self.close()
            with open(self.log_path) as f:
                log = f.read()[-3000:]
            why = f"no answer within {TIMEOUT_S} s" if not ready else "the process died"
            return False, f"{why}; its stderr:\n{log}"
        answer = json.loads(answer)
        return answer["ok"], answer["output"]

    def close(self):
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            self.log.close()
            self.process = None


@pytest.fixture(scope="module")
def shared_process(tmp_path_factory):
    process = SharedProcess(tmp_path_factory.mktemp("docs") / "stderr.log")
    yield process
    process.close()


def test_the_docs_have_python_blocks():
    assert len(blocks()) >= 5


@pytest.mark.parametrize("code, reason", blocks())
def test_doc_block_runs(code, reason, tmp_path, shared_process):
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
    if NEEDS_OWN_PROCESS.search(code):
        (tmp_path / "block.py").write_text(code)
        # `-W` cannot take these messages (it splits at their colons): a filter set first.
        run_block = (
            "import re, runpy, warnings\n"
            f"for message in {OFF_SCHEDULE!r}:\n"
            "    warnings.filterwarnings('error', re.escape(message), UserWarning)\n"
            "runpy.run_path('block.py', run_name='__main__')\n"
        )
        process = subprocess.run(
            [sys.executable, "-c", run_block],
            cwd=tmp_path,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        ok, output = process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    else:
        ok, output = shared_process.run(code, tmp_path)
    assert ok, output


def serve():
    """Run each block read from stdin; answer on the stdout this process started with."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else written to stdout (C++ logs) goes to stderr
    for request in sys.stdin:
        request = json.loads(request)
        keras.backend.clear_session()
        os.chdir(request["cwd"])
        output = io.StringIO()
        ok = True
        with (
            contextlib.redirect_stdout(output),
            contextlib.redirect_stderr(output),
            warnings.catch_warnings(),
        ):
            for message in OFF_SCHEDULE:
                warnings.filterwarnings("error", message=re.escape(message), category=UserWarning)
            try:
                exec(compile(request["code"], "block.py", "exec"), {"__name__": "__main__"})
            except SystemExit as error:
                ok = error.code in (None, 0)
            except BaseException:
                ok = False
                traceback.print_exc()
        answers.write(json.dumps({"ok": ok, "output": output.getvalue()[-6000:]}) + "\n")
        answers.flush()


if __name__ == "__main__":
    serve()
