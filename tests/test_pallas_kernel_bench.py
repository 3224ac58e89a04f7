"""`python -m infer.kernel_bench` runs end to end on CPU (interpret mode, small shapes)."""

import json

from infer import kernel_bench


def test_kernel_bench_writes_ratios(tmp_path, monkeypatch):
    monkeypatch.setitem(kernel_bench.SHAPES, "cpu", dict(
        decode=[(1, 2, 4, 2, 16, 64)], flash=(1, 32, 2, 16), matmul=64, copy_mib=1, dtype="float32",
        block_t=16, block_q=16, block_k=16))
    assert kernel_bench.main(["--out", str(tmp_path), "--repeats", "1"]) == 0
    report = json.loads((tmp_path / "kernels.json").read_text())
    assert report["pallas_interpret"] and "not meaningful" in report["note"]
    assert report["command"].startswith("python -m infer.kernel_bench") and report["device"]
    (decode,) = report["decode_attention"]
    for impl in ("xla", "pallas"):
        assert decode[impl]["fraction_of_copy_bandwidth"] > 0
        assert report["flash_attention"][impl]["fraction_of_matmul"] > 0
