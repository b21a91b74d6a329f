"""The compiled CPU kernels' build cache is keyed on what the binary requires: the flags and the CPU
target that ``-march=native`` resolves to, so that nodes of different CPU generations sharing one cache
directory each get a build they can run."""
import stat

import torch.utils.cpp_extension

from rmt.models.fast import kernel

GCC_LINE = (" /usr/lib/gcc/x86_64-linux-gnu/12/cc1plus -E -quiet -v -imultiarch x86_64-linux-gnu -D_GNU_SOURCE - "
            "-march={cpu} -mmmx -msse4.2 -mavx2 {avx512} --param l1-cache-size=32 -mtune={cpu} -dumpbase -")
CLANG_LINE = (' "/usr/lib/llvm-14/bin/clang" -cc1 -triple x86_64-pc-linux-gnu -E '
              '-target-cpu {cpu} -target-feature +avx2 -')


def fake_compiler(tmp_path, name, line):
    """A stand-in `c++` that prints, as gcc/clang -v do, the command line of its compiler proper."""
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\necho \"COLLECT_GCC_OPTIONS='-march=native' '-E' '-v'\" >&2\necho '{line}' >&2\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_native_target_reads_the_resolved_cpu_and_features(tmp_path):
    gcc = fake_compiler(tmp_path, "gcc", GCC_LINE.format(cpu="znver3", avx512="-mavx512f -mavx512bf16"))
    assert kernel.native_target(gcc) == ("-march=znver3 -mmmx -msse4.2 -mavx2 -mavx512f -mavx512bf16 "
                                         "--param l1-cache-size=32 -mtune=znver3")
    clang = fake_compiler(tmp_path, "clang", CLANG_LINE.format(cpu="skylake"))
    assert kernel.native_target(clang) == "-target-cpu skylake -target-feature +avx2"


def test_native_target_of_this_machine_names_its_cpu():
    target = kernel.native_target()
    assert "-march=" in target or "-target-cpu" in target
    assert "native" not in target


def test_two_feature_sets_get_two_builds(tmp_path, monkeypatch):
    """Two CPUs of different generations (one with AVX-512, one without) load two differently named builds
    from one shared cache; the same CPU finds its own build again."""
    names = []
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda name, **kwargs: names.append(name) or object())
    for avx512 in ("-mavx512f -mavx512bf16", "-mno-avx512f -mno-avx512bf16", "-mavx512f -mavx512bf16"):
        monkeypatch.setenv("CXX", fake_compiler(tmp_path, "cxx", GCC_LINE.format(cpu="znver3", avx512=avx512)))
        monkeypatch.setattr(kernel, "_module", None)
        monkeypatch.setattr(kernel, "_failed", False)
        assert kernel._load() is not None
    assert names[0] != names[1] and names[0] == names[2]
    assert all(name.startswith("rmt_cpu_kernels_") for name in names)


def test_a_compiler_that_cannot_resolve_native_turns_the_kernels_off(tmp_path, monkeypatch, caplog):
    broken = tmp_path / "cxx"
    broken.write_text("#!/bin/sh\necho 'unrecognized option -march=native' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CXX", str(broken))
    monkeypatch.setattr(kernel, "_module", None)
    monkeypatch.setattr(kernel, "_failed", False)
    assert kernel._load() is None
    assert "unrecognized option" in caplog.text


def test_build_name_depends_on_flags_torch_and_source():
    target = "-march=znver3 -mavx2"
    assert kernel.build_name(("-O3",), target) != kernel.build_name(("-O2",), target)
    name = kernel.build_name(("-O3",), target)
    assert name.isidentifier()  # the built extension is imported under this name
    # a function of its inputs only (no time, pid or path of its own): two CPUs that resolve alike share one build
    assert kernel.build_name(["-O3"], "-march=znver3 -mavx2") == name
    # two environments (a venv beside the system's torch) get a build each
    assert kernel.build_name(("-O3",), target, "2.14.1 /venv/torch") != kernel.build_name(("-O3",), target,
                                                                                          "2.14.1 /usr/torch")
    # and two checkouts: the compile command names the source, and ninja rebuilds when it changes
    assert kernel.build_name(("-O3",), target, "t", "/a/cpu_kernels.cpp") != kernel.build_name(("-O3",), target, "t",
                                                                                               "/b/cpu_kernels.cpp")
