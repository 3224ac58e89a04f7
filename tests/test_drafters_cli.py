"""--drafter in the CLIs (infer.generate, infer.speculative_rows.make_decoders) and `python -m infer.drafters`."""

import json
import re

import pytest
from flax import nnx

from infer import drafters as drafters_cli
from infer.generate import main as generate_main
from infer.speculative_rows import make_decoders
from jaxaccel import ModelConfig, Transformer, load_hf, save_hf
from jaxaccel.data import train_tokenizer

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = train_tokenizer([TEXT], vocab_size=300)
    config = ModelConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=128, eos_token_id=0)
    return save_hf(Transformer(config, rngs=nnx.Rngs(0)), tmp_path_factory.mktemp("model"), tokenizer=tokenizer)


def generate_json(capsys, *args):
    assert generate_main([*map(str, args), "--json"]) == 0, capsys.readouterr().err
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("spec", ["pld:depth=4", "recycling"])
def test_generate_with_a_drafter_equals_plain_decoding(model_dir, capsys, spec):
    prompt = "    return a + b\n\ndef mul(a, b):\n    return a + b\n\ndef"
    plain = generate_json(capsys, "--model", model_dir, "--prompt", prompt, "--max-new-tokens", 20)[0]
    drafted = generate_json(capsys, "--model", model_dir, "--prompt", prompt, "--max-new-tokens", 20,
                            "--drafter", spec)[0]
    assert drafted["tokens"] == plain["tokens"]
    assert drafted["mean_accepted_tokens"] >= 1.0


@pytest.mark.parametrize("args,message", [
    (["--drafter", "nope"], "unknown drafter 'nope'"),
    (["--drafter", "pld:size=3"], r"unknown option\(s\) \['size'\] for drafter 'pld'"),
    (["--drafter", "eagle"], "the eagle drafter needs trained heads"),
    (["--drafter", "recycling", "--tree", "chain"], "--tree chain needs --heads"),
])
def test_bad_drafter_exits_2_with_one_line(model_dir, capsys, args, message):
    assert generate_main(["--model", str(model_dir), "--prompt", "def", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err), err


def test_make_decoders_takes_drafter_specs(model_dir):
    decoders = make_decoders(load_hf(model_dir), model_dir, [], [None], ["pld", "pld:depth=3", "recycling"])
    assert list(decoders) == ["ar", "pld", "pld:depth=3", "recycling"]
    assert decoders["pld:depth=3"][1] == {"num_nodes": 4, "depth": 3, "drafter": "pld:depth=3", "tree": "default"}


def test_the_listing_names_every_record(capsys):
    assert drafters_cli.main(["--json"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"medusa", "hydra", "eagle", "pld", "recycling", "lookahead", "layerskip"} <= set(records)
    assert records["layerskip"]["composes_with_heads"] and not records["recycling"]["composes_with_heads"]
    assert records["eagle"]["trained"] and records["eagle"]["dynamic_trees"] and not records["pld"]["trained"]
    assert records["pld"]["default_tree_nodes"] == 9 and records["recycling"]["default_tree_nodes"] == 24
    assert drafters_cli.main([]) == 0 and "| pld | nothing (training-free) |" in capsys.readouterr().out
