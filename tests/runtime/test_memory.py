"""rmt.runtime.memory: glibc keeps freed memory, so re-allocating a large tensor costs no page faults."""
import os
import subprocess
import sys

import pytest

from rmt import cli
from rmt.runtime import memory

CHILD = r"""
import resource, sys
import torch
from rmt.runtime.memory import keep_freed_memory
applied = keep_freed_memory()
def faults_of_realloc():
    # warm-up: 64 MB allocated, touched and freed. The heap grows twice, on the first allocation and on
    # the second or (1 run in 8 here: small allocations made in between land in the freed block) third
    for _ in range(3):
        torch.ones(64 << 18)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        torch.ones(64 << 18)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, faults_of_realloc())
"""


def _run(env_value):
    env = dict(os.environ, RMT_KEEP_FREED_MEMORY=env_value)
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_keep_freed_memory_removes_page_faults():
    applied, faults = _run("1")
    assert applied
    # three 64 MB tensors touched in full would be 3 x 16384 faults of 4 KB pages if each came fresh
    assert faults < 500, faults
    applied_off, faults_off = _run("0")
    assert not applied_off
    assert faults_off > 10 * max(faults, 100), (faults_off, faults)


def test_cli_applies_it(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["models", "--json"]) == 0
    assert calls == [1]  # once per process, before any command's work
    assert memory.__all__ == ["keep_freed_memory"]
