"""python -m infer.bench on a tiny checkpoint: it runs end to end and checks parity with transformers."""

import json

from hf_models import build_hf_model, save_hf_model
from infer.bench import main, random_config


def test_bench_writes_a_report_with_identical_greedy_tokens(tmp_path, capsys):
    model_dir = save_hf_model(build_hf_model("qwen2_gqa", seed=4), tmp_path / "model")
    args = ["--model", str(model_dir), "--prompt-len", "5", "--max-new-tokens", "6", "--repeats", "1",
            "--batch-size", "2", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    report = json.loads((tmp_path / "out/bench.json").read_text())
    assert report["tokens_identical"] is True
    assert [len(t) for t in report["ours"]["tokens"]] == [6, 6]
    assert report["floor"]["seconds"] > 0 and report["ratios"]["step_over_floor"] > 0
    assert "| weight-streaming floor |" in (tmp_path / "out/bench.md").read_text()
    assert "greedy tokens identical: **True**" in capsys.readouterr().out


def test_random_config_reaches_the_requested_size():
    for megabytes in (150, 200, 300):  # whole layers of 45 MB each
        assert megabytes <= random_config(megabytes).num_params() * 4 / 1e6 < megabytes + 46
