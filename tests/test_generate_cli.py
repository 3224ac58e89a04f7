"""python -m infer.generate: output contract, batching, the tokenizer used as saved, bad input."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

from infer.generate import batch_seed, main
from jaxaccel import ModelConfig, Transformer, load_hf, save_hf
from jaxaccel.data import train_tokenizer
from jaxaccel.decoding import Sampler, generate
from jaxaccel.decoding.text import encode_prompts, load_model_tokenizer

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 20
PROMPTS = ["def add(", "class Po", "    return a + b\n\ndef mul(a, b):\n    return"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = train_tokenizer([TEXT], vocab_size=300)
    config = ModelConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=48, eos_token_id=0)
    return save_hf(Transformer(config, rngs=nnx.Rngs(0)), tmp_path_factory.mktemp("model"), tokenizer=tokenizer)


def run_json(capsys, *args):
    assert main([*map(str, args), "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_json_output_in_batches_matches_the_library(model_dir, tmp_path, capsys):
    prompt_file = tmp_path / "p.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    records = run_json(capsys, "--model", model_dir, "--prompt-file", prompt_file, "--max-new-tokens", 7,
                       "--temperature", 0.9, "--top-k", 50, "--seed", 3, "--batch-size", 2)
    assert [r["prompt"] for r in records] == PROMPTS

    tokenizer = load_model_tokenizer(model_dir)
    ids = encode_prompts(tokenizer, PROMPTS)
    assert ids[0] == tokenizer.encode("def add(").ids  # nothing added: this tokenizer adds no BOS
    # Batches of 2, the last one padded with a copy of its first prompt, each with its own seed.
    model, policy = load_hf(model_dir), Sampler(0.9, top_k=50)
    want = [tokens for index, batch in enumerate([ids[:2], ids[2:] * 2])
            for tokens in generate(model, batch, policy=policy, max_new_tokens=7, stop_tokens=[0],
                                   seed=batch_seed(3, index)).sequences()]
    for record, tokens in zip(records, want):
        assert record["tokens"] == tokens
        assert record["completion"] == tokenizer.decode(tokens)
        assert record["num_tokens"] == len(tokens) and 1 <= len(tokens) <= 7
        assert record["finish_reason"] == ("stop" if tokens[-1] == 0 else "length")
        assert record["mean_accepted_tokens"] == 1.0
        assert record["tokens_per_s"] > 0


def test_single_prompt_prints_the_completion(model_dir, capsys):
    assert main(["--model", str(model_dir), "--prompt", "class Po", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out
    record = run_json(capsys, "--model", model_dir, "--prompt", "class Po", "--max-new-tokens", 5)[0]
    assert text == record["completion"] + "\n"


@pytest.mark.parametrize("args,message", [
    (["--prompt", "x" * 200], "prompt 0 is longer than the context: \\d+ tokens, the model has 48 positions"),
    (["--prompt", "x", "--temperature", "-1"], "temperature must be >= 0, got -1.0"),
    (["--prompt-file", "EMPTY"], "prompt file .*empty.jsonl is empty"),
    (["--prompt", ""], "prompt 0 is empty"),
])
def test_bad_input_names_the_problem(model_dir, tmp_path, capsys, args, message):
    (tmp_path / "empty.jsonl").write_text("\n")
    args = [str(tmp_path / "empty.jsonl") if a == "EMPTY" else a for a in args]
    assert main(["--model", str(model_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err), err


def test_not_a_model_directory_exits_nonzero_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "infer.generate", "--model", str(tmp_path), "--prompt", "hi"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path} is not a model directory: it has no config.json\n"


def test_an_unknown_model_name_exits_2_naming_the_known_ones(model_dir, tmp_path, capsys):
    assert main(["--model", str(tmp_path / "no-such-model"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a model directory nor a model name" in err and "smollm2-135m-instruct" in err
