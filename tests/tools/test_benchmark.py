"""`rmt benchmark`: the interleaved timer, the peak-memory tracker and the command line."""
import json

import pytest
import torch

from rmt.cli import main
from rmt.errors import RMTError
from rmt.tools.benchmark import PeakMemory, benchmark, build_model


def test_peak_memory_counts_live_tensors_exactly():
    mib = 2**20
    with PeakMemory() as tracker:
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)
        del a
        c = torch.empty(mib, dtype=torch.uint8)
        view = c[: mib // 2]  # a view shares its storage: not counted again
        del b, c, view
    assert tracker.peak == 3 * mib
    assert tracker.live == 0


def test_peak_memory_ignores_views_of_older_tensors():
    weight = torch.randn(256, 256)
    with PeakMemory() as tracker:
        transposed = weight.t()  # a view: no new memory
        weight.mul_(2)  # in place: no new memory
        product = transposed @ torch.ones(256, 1)  # 1 KiB
    assert tracker.peak == 2 * 256 * 4  # the ones and the product
    del transposed, product


def test_peak_memory_of_a_matmul_chain():
    x = torch.randn(64, 64)
    with PeakMemory() as tracker:
        y = x @ x  # 16 KiB
        z = y @ y  # 16 KiB, while y is alive
        del y
    assert tracker.peak == 2 * 64 * 64 * 4
    del z


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["features", "train"])  # `infer` runs in the CLI test
def test_benchmark_times_models_side_by_side(mode):
    results = benchmark(["rmt_t", "reference:rmt_t"], batch_size=2, img_size=(32, 48), mode=mode, warmup=1, iters=2)
    assert [r.model for r in results] == ["rmt_t", "reference:rmt_t"]
    for r in results:
        assert r.mode == mode and len(r.times_ms) == 2 and r.img_per_s > 0 and r.peak_mb > 0
        assert r.ms_per_batch == pytest.approx(sorted(r.times_ms)[0] / 2 + sorted(r.times_ms)[1] / 2)
    if mode == "train":  # the gradients alone take as much as the weights (AdamW state exists from warm-up)
        weights_mb = sum(p.numel() for p in build_model("rmt_t", (32, 48)).parameters()) * 4 / 2**20
        assert results[0].peak_mb > weights_mb


def test_build_model_specs():
    assert type(build_model("reference:rmt_t", (64, 64))).__name__ == "ReferenceRMT"
    assert type(build_model("rmt_t", (64, 64))).__name__ == "RMT"
    with pytest.raises(RMTError, match="unknown model"):
        build_model("not_a_model", (64, 64))
    with pytest.raises(RMTError):
        build_model("reference:rmt_q", (64, 64))


def test_benchmark_rejects_bad_arguments():
    with pytest.raises(RMTError, match="mode"):
        benchmark(["rmt_t"], mode="fly")
    with pytest.raises(RMTError, match="positive"):
        benchmark(["rmt_t"], batch_size=0)
    with pytest.raises(RMTError, match="amp"):
        benchmark(["rmt_t"], amp="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(RMTError, match="CUDA"):
            benchmark(["rmt_t"], device="cuda")


@pytest.mark.e2e
def test_cli_json_and_table(capsys):
    assert main(["benchmark", "rmt_t", "--batch-size", "2", "--img-size", "32", "32", "--iters", "1",
                 "--warmup", "0", "--peers", "reference:rmt_t", "--mode", "both", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["mode"]) for r in rows] == [("rmt_t", "infer"), ("reference:rmt_t", "infer"),
                                                       ("rmt_t", "train"), ("reference:rmt_t", "train")]
    for r in rows:
        assert r["img_per_s"] > 0 and r["speedup_of_first"] > 0 and r["img_size"] == [32, 32]
    assert main(["benchmark", "rmt_t", "--batch-size", "1", "--img-size", "64", "64", "--iters", "1",
                 "--warmup", "0", "--no-peers", "--no-memory"]) == 0
    table = capsys.readouterr().out
    assert "img/s" in table and "rmt_t" in table and "reference" not in table


def test_cli_bad_model_is_one_line_error(capsys):
    assert main(["benchmark", "rmt_x", "--no-peers"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rmt_x" in err[0]
