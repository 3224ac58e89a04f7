"""python -m train.responses: the base model's own greedy answers to the training prompts, in
resumable shards."""

import json

from chat_models import build_chat_model

from jaxaccel.chat import ChatTemplate
from jaxaccel.decoding import AutoregressiveDecoder
from jaxaccel.hf import load_hf
from train import responses

SETTINGS = ["--limit", "6", "--shard-size", "4", "--batch-size", "2", "--max-new-tokens", "5", "--no-progress"]


def read_shards(out):
    return [json.loads(line) for path in sorted(out.glob("shard-*.jsonl")) for line in path.read_text().splitlines()]


def test_answers_are_the_models_own_greedy_chat_answers_and_a_rerun_resumes(tmp_path, capsys):
    model_dir = build_chat_model(tmp_path / "chat", context=4096)  # room for the longest training prompts
    out = tmp_path / "responses"
    assert responses.main(["--model", str(model_dir), "--out", str(out), *SETTINGS]) == 0
    records = read_shards(out)
    config = json.loads((out / "config.json").read_text())
    assert config["kept"] + config["skipped_too_long"] == 6 and config["kept"] >= 4  # > --max-prompt-tokens: skipped
    assert len(records) == config["kept"] and len({r["key"] for r in records}) == len(records)
    assert sorted(p.name for p in out.glob("shard-*.jsonl")) == ["shard-00000.jsonl", "shard-00001.jsonl"]

    # Each answer is what greedy decoding of that prompt alone gives (batching changed nothing).
    model, template = load_hf(model_dir), ChatTemplate.from_model_dir(model_dir)
    decoder = AutoregressiveDecoder(model)
    for r in records[:3]:
        alone = decoder.generate([r["prompt_ids"]], max_new_tokens=5, stop_tokens=list(template.stop_ids))
        assert r["response_ids"] == alone.sequences()[0]
        assert template.tokenizer.decode(r["prompt_ids"], skip_special_tokens=False).startswith("<|im_start|>")
        assert r["finish_reason"] in ("stop", "length")

    # A rerun with the same command finds every shard done; one missing shard is redone alone.
    first = (out / "shard-00000.jsonl").stat().st_mtime_ns
    (out / "shard-00001.jsonl").unlink()
    assert responses.main(["--model", str(model_dir), "--out", str(out), *SETTINGS]) == 0
    assert (out / "shard-00000.jsonl").stat().st_mtime_ns == first
    assert read_shards(out) == records

    # Other settings into the same directory: refused, naming what differs.
    capsys.readouterr()
    assert responses.main(["--model", str(model_dir), "--out", str(out), *SETTINGS, "--seed", "1"]) == 2
    assert "seed" in capsys.readouterr().err


def test_sampled_answers_differ_from_greedy_and_a_resumed_run_draws_the_same(tmp_path, capsys):
    model_dir = build_chat_model(tmp_path / "chat", context=4096)
    greedy, sampled = tmp_path / "greedy", tmp_path / "sampled"
    assert responses.main(["--model", str(model_dir), "--out", str(greedy), *SETTINGS]) == 0
    hot = [*SETTINGS, "--temperature", "1.5"]
    assert responses.main(["--model", str(model_dir), "--out", str(sampled), *hot]) == 0
    by_key = {r["key"]: r for r in read_shards(greedy)}
    records = read_shards(sampled)
    assert json.loads((sampled / "config.json").read_text())["settings"]["temperature"] == 1.5
    assert sorted(r["key"] for r in records) == sorted(by_key)  # the same prompts, answered anew
    assert all(r["prompt_ids"] == by_key[r["key"]]["prompt_ids"] for r in records)
    assert any(r["response_ids"] != by_key[r["key"]]["response_ids"] for r in records)

    (sampled / "shard-00000.jsonl").unlink()  # resumed: the same draws
    assert responses.main(["--model", str(model_dir), "--out", str(sampled), *hot]) == 0
    assert read_shards(sampled) == records

    capsys.readouterr()  # greedy into the sampled directory, or a negative temperature: refused
    assert responses.main(["--model", str(model_dir), "--out", str(sampled), *SETTINGS]) == 2
    assert "temperature" in capsys.readouterr().err
    assert responses.main(["--model", str(model_dir), "--out", str(tmp_path / "x"), *SETTINGS,
                           "--temperature", "-1"]) == 2
    assert "--temperature must be >= 0" in capsys.readouterr().err
