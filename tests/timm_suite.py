"""Run timm's own generic model tests on the rmt models.

timm publishes its test suite in its source distribution. This script fetches the sdist of the timm
version installed here from the package index (with pip, so the machine's index settings apply),
extracts ``tests/test_models.py`` into a temporary directory, and runs it with pytest, unchanged,
with our models registered and only the rmt cases selected. Nothing of timm's is kept in this
repository.

How our models get in: ``test_models.py`` builds its parametrized model lists at import time from
``timm.list_models``, so the conftest written next to it imports :mod:`rmt` first. The
forward_intermediates tests take only the model families named in the file's own module list
(``FEAT_INTER_FILTERS``, timm's families with ``forward_intermediates``); the conftest adds our
module, ``rmt``, to module-filtered ``list_models`` calls, which is what timm does for a family of
its own. Items whose ``model_name`` is not an rmt model are deselected.

Usage::

    python tests/timm_suite.py [--keep DIR] [extra pytest arguments]

Exit status: pytest's, or 1 with a message when the sdist cannot be fetched (no silent skip).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUITE = "tests/test_models.py"

CONFTEST = '''\
"""Written by rmt's tests/timm_suite.py: run timm's model tests on the rmt models only."""
import re
from pathlib import Path

import pytest
import timm

import rmt  # noqa: F401  registers rmt_t/s/b/l before test_models.py builds its lists

RMT_MODULE = "rmt"
PYTEST_MARKS = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}
_list_models = timm.list_models


def _list_models_with_rmt(*args, **kwargs):
    """timm.list_models; a filter by module list (timm's families with forward_intermediates) includes ours."""
    module = kwargs.get("module")
    if isinstance(module, (list, tuple)) and module and RMT_MODULE not in module:
        kwargs["module"] = [*module, RMT_MODULE]
    return _list_models(*args, **kwargs)


timm.list_models = _list_models_with_rmt
RMT_MODELS = set(_list_models(module=RMT_MODULE))


def pytest_configure(config):
    source = Path(__file__).with_name("test_models.py").read_text()
    for mark in sorted(set(re.findall(r"@pytest\\.mark\\.(\\w+)", source)) - PYTEST_MARKS):  # timm's own marks
        config.addinivalue_line("markers", f"{mark}: timm test marker")


def _is_rmt(item) -> bool:
    name = getattr(item, "callspec", None) and item.callspec.params.get("model_name")
    return isinstance(name, str) and name.split(".")[0] in RMT_MODELS


def pytest_collection_modifyitems(config, items):
    selected = [item for item in items if _is_rmt(item)]
    deselected = [item for item in items if not _is_rmt(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = selected
    counts = {}
    for item in selected:
        counts[item.originalname] = counts.get(item.originalname, 0) + 1
    print("\\nrmt cases per timm test: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
'''


def fetch_suite(timm_version: str, workdir: Path) -> Path:
    """Download timm's sdist and extract its ``tests/test_models.py`` into ``workdir``."""
    download = workdir / "sdist"
    cmd = [sys.executable, "-m", "pip", "download", f"timm=={timm_version}", "--no-deps", "--no-binary", ":all:",
           "--timeout", "30", "--retries", "2", "--quiet", "-d", str(download)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    archives = sorted(download.glob("timm-*.tar.gz")) if download.is_dir() else []
    if not archives:
        reason = (result.stderr or result.stdout).strip().splitlines()
        raise SystemExit(f"timm_suite: FAILED: cannot fetch the source distribution of timm=={timm_version} from the "
                         f"package index ({reason[-1] if reason else f'pip exited {result.returncode}'}); "
                         f"timm's model tests were not run")
    with tarfile.open(archives[0]) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("/" + SUITE)), None)
        if member is None:
            raise SystemExit(f"timm_suite: FAILED: {archives[0].name} has no {SUITE}")
        (workdir / "test_models.py").write_bytes(tar.extractfile(member).read())
    return workdir / "test_models.py"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="put the suite in this directory and keep it (default: a temp dir)")
    parser.add_argument("--timm-version", default=version("timm"), help="timm version whose suite to run "
                        "(default: the installed one)")
    args, pytest_args = parser.parse_known_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rmt-timm-suite-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        suite = fetch_suite(args.timm_version, workdir)
        (workdir / "conftest.py").write_text(CONFTEST)
        (workdir / "pytest.ini").write_text("[pytest]\n")  # keeps this repository's pytest settings out
        print(f"timm_suite: timm {args.timm_version} {SUITE} fetched in {time.perf_counter() - start:.0f} s; "
              f"running the rmt cases", flush=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p))
        # one thread unless asked otherwise: the test models are small, and on a busy machine OpenMP's
        # waiting threads made two threads slower (the whole suite here: 220-390 s with one, 630 s with two)
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [sys.executable, "-m", "pytest", str(suite), "-c", str(workdir / "pytest.ini"), "--rootdir",
               str(workdir), "-p", "no:cacheprovider", "-q", *pytest_args]
        code = subprocess.call(cmd, cwd=workdir, env=env)
    print(f"timm_suite: pytest exited {code} after {time.perf_counter() - start:.0f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
