"""Native builds survive interruption: a build killed mid-way never blocks the next start, and two processes
starting at once build once. A small C extension stands in for the decode kernels (same builder, same lock); a
compiler wrapper slows each compile, so that a build can be caught and killed while it runs."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from streamllm.backends.native import build_extension

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")

SOURCE = """
#include <Python.h>
static PyObject *answer(PyObject *self, PyObject *args) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, ""}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "streamllm_build_probe", NULL, -1, methods};
PyMODINIT_FUNC PyInit_streamllm_build_probe(void) { return PyModule_Create(&module); }
"""

BUILD = """
import logging, sys
from pathlib import Path
from streamllm.backends.native import build_extension
logging.basicConfig(level=logging.WARNING, format="%(message)s")
module = build_extension("streamllm_build_probe", Path(sys.argv[1]), Path(sys.argv[2]), [], [], "the probe")
print("answer", module.answer(), flush=True)
"""


@pytest.fixture
def probe(tmp_path):
    source = tmp_path / "probe.cpp"
    source.write_text(SOURCE)
    return source, tmp_path / "build"


def _slow_compiler(folder: Path, seconds: float) -> Path:
    """A c++ that logs and sleeps before each compile (not before the version checks torch runs first)."""
    wrapper = folder / "slow-c++"
    wrapper.write_text(
        textwrap.dedent(f"""\
        #!/bin/sh
        case " $* " in *" -c "*) echo compile >> {folder}/compiles; sleep {seconds};; esac
        exec c++ "$@"
        """)
    )
    wrapper.chmod(0o755)
    return wrapper


def _start(source: Path, build: Path, cxx: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ, CXX=str(cxx) if cxx else "c++")
    return subprocess.Popen(
        [sys.executable, "-c", BUILD, str(source), str(build)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_build_killed_midway_does_not_block_the_next_start(probe, tmp_path):
    source, build = probe
    first = _start(source, build, _slow_compiler(tmp_path, 120))
    _wait_for(tmp_path / "compiles", first)
    assert (build / "lock").exists()  # torch's marker of a build in progress
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    assert (build / "lock").exists()  # left behind: before, every later start waited on it forever
    again = _start(source, build)
    out, err = again.communicate(timeout=180)
    assert again.returncode == 0, err
    assert "answer 42" in out
    assert "left by a build that was interrupted" in err


def test_two_starts_at_once_build_once(probe, tmp_path):
    source, build = probe
    slow = _slow_compiler(tmp_path, 10)
    procs = [_start(source, build, slow) for _ in range(2)]
    results = [p.communicate(timeout=180) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
        assert "answer 42" in out
    assert (tmp_path / "compiles").read_text().splitlines() == ["compile"]
    assert sum("waiting for it" in err for _, err in results) == 1


def test_a_lock_that_cannot_be_taken_is_named(probe):
    source, build = probe
    (build / "build.flock").mkdir(parents=True)
    with pytest.raises(OSError, match="cannot take the build lock .*build.flock"):
        build_extension("streamllm_build_probe", source, build, [], [], "the probe")
