"""python -m train.heads from a trained tiny base: each kind end to end, kill -9 and resume, bad input."""

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from jaxaccel import Transformer, save_hf
from jaxaccel.data import load_tokenizer
from jaxaccel.heads import load_heads, read_heads_config
from jaxaccel.presets import get_preset
from jaxaccel.sharding import make_mesh
from jaxaccel.training import Pretraining, read_metrics
from train import heads as cli

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 20
RUN_ARGS = ["--steps", str(STEPS), "--batch-size", "8", "--seq-len", "32", "--corpus-max-bytes", "300000",
            "--num-heads", "3", "--lr", "3e-3", "--warmup-steps", "3", "--checkpoint-every", "10",
            "--eval-prompts", "8", "--eval-prompt-len", "16", "--eval-new-tokens", "17", "--eval-batch-size", "8",
            "--no-progress"]  # eval decodes 16 + 17 tokens per row in batches of 8, as the generated rows do: one compile
KIND_ARGS = {
    "medusa": ["--kind", "medusa", "--mesh", "data=2,fsdp=4"],
    "hydra": ["--kind", "hydra", "--prefix-layer", "--generated-rows", "8"],
    "eagle": ["--kind", "eagle", "--unroll", "2"],
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The tiny preset, trained briefly on one device and exported."""
    preset = get_preset("tiny")
    train = preset.train.replace(steps=60, eval_every=0, checkpoint_every=0)
    mesh = make_mesh("data=1", devices=jax.devices()[:1])
    with Pretraining(preset.model, train, tmp_path_factory.mktemp("base") / "run", mesh=mesh) as run:
        run.train(lambda step, metrics: None)
        return run.export()


@pytest.fixture(scope="module")
def runs(base_dir, tmp_path_factory):
    """kind -> its heads directory, each trained once for the module."""
    root, done = tmp_path_factory.mktemp("heads"), {}

    def get(kind):
        if kind not in done:
            out = root / kind
            assert cli.main(RUN_ARGS + KIND_ARGS[kind] + ["--base", str(base_dir), "--out", str(out)]) == 0
            done[kind] = out
        return done[kind]

    return get


def losses(heads_dir):
    records = [r for r in read_metrics(pathlib.Path(heads_dir) / "metrics.jsonl") if "loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in records}


def snapshot(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(pathlib.Path(directory).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", sorted(KIND_ARGS))
def test_each_kind_trains_and_writes_its_heads_directory(runs, base_dir, kind):
    out = runs(kind)
    by_step = losses(out)
    assert sorted(by_step) == list(range(1, STEPS + 1))
    assert np.mean([by_step[s] for s in range(STEPS - 4, STEPS + 1)]) < 0.9 * np.mean([by_step[s] for s in range(1, 6)])

    result = json.loads((out / "eval.json").read_text())
    assert result["split"] == "test" and result["kind"] == kind and result["step"] == STEPS
    assert [d["depth"] for d in result["depths"]] == [1, 2, 3] and result["positions"] == 8 * (17 - 3)
    for d in result["depths"]:
        assert 0 <= d["chain"] <= d["top1"] <= d["top5"] <= 1
    chains = [d["chain"] for d in result["depths"]]
    assert chains == sorted(chains, reverse=True)
    assert result["mean_accepted_chain"] == pytest.approx(1 + sum(chains))
    assert result["path_consistency"] > 0.9
    assert [r for r in read_metrics(out / "metrics.jsonl") if "test_top1_1" in r][0]["test_top1_1"] == \
        result["depths"][0]["top1"]

    config, record = read_heads_config(out)
    assert config.kind == kind and config.num_heads == 3 and record["base"]["path"] == str(base_dir.absolute())
    heads = load_heads(out, base_dir)
    assert type(heads).__name__.lower().startswith(kind)
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [10, 20]
    assert list((out / "tb").glob("events.out.tfevents.*"))


def run_cli(base_dir, out, *extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")  # XLA_FLAGS: 8 devices, as here
    args = RUN_ARGS + KIND_ARGS["medusa"] + ["--base", str(base_dir), "--out", str(out), *extra]
    return subprocess.Popen([sys.executable, "-m", "train.heads", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_matches_uninterrupted(runs, base_dir, tmp_path, capsys):
    expected = losses(runs("medusa"))
    out = tmp_path / "heads"
    proc = run_cli(base_dir, out, "--no-eval")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            ckpts = out / "checkpoints"
            if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    killed_at = max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert killed_at < STEPS and not (out / "heads.safetensors").exists(), "the kill should land mid-run"

    capsys.readouterr()
    assert cli.main(RUN_ARGS + KIND_ARGS["medusa"] + ["--base", str(base_dir), "--out", str(out), "--no-eval"]) == 0
    assert f"resuming from step {killed_at}" in capsys.readouterr().err
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], [expected[s] for s in range(1, STEPS + 1)],
                               rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def other_base(base_dir, tmp_path_factory):
    """Same config and tokenizer as base_dir, other weights."""
    model = Transformer(get_preset("tiny").model.replace(eos_token_id=0), rngs=nnx.Rngs(1))
    return save_hf(model, tmp_path_factory.mktemp("other") / "model", tokenizer=load_tokenizer(base_dir))


@pytest.mark.parametrize("args, message", [
    (["--kind", "lookahead"], "unknown heads kind 'lookahead'; expected one of ['eagle', 'eagle3', 'hydra', 'medusa']"),
    (["--base", "{empty}"], "is not a model directory: it has no config.json"),
    (["--base", "/no/such/model"], "/no/such/model is neither a model directory nor a model name"),
    (["--num-heads", "40"], "40 draft heads need sequences of at least 42 tokens"),
    (["--seq-len", "512"], "seq_len (512) exceeds the base model's context (128 positions)"),
    (["--eval-new-tokens", "3"], "eval continuations of 3 tokens cannot score draft depth 3: they need at least 4"),
    (["--base", "{other}"], "holds checkpoints of a different configuration (base.weights_sha256: checkpoint has"),
])
def test_bad_input_is_one_line_and_changes_nothing(runs, base_dir, other_base, tmp_path, capsys, args, message):
    out = runs("medusa")  # may train first (whichever test asks first): its banner is not this run's
    before = snapshot(out)
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    args = [a.format(empty=tmp_path / "empty", other=other_base) for a in args]
    argv = RUN_ARGS + KIND_ARGS["medusa"] + ["--base", str(base_dir), "--out", str(out)] + args
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert snapshot(out) == before


def test_generate_and_bench_with_heads(runs, base_dir, capsys, monkeypatch):
    """infer.generate --heads gives ar's tokens at T = 0; infer.bench --tune-tree saves a tree that
    --tree auto then uses."""
    from infer import bench, generate, speculative_rows

    monkeypatch.setattr(speculative_rows, "TUNE_SIZES", (2, 8))  # each size is one more compiled step: two suffice here

    prompt = ["--model", str(base_dir), "--prompt", "import os\ndef main(", "--max-new-tokens", "24", "--json"]
    assert generate.main(prompt) == 0
    ar = json.loads(capsys.readouterr().out)
    heads_dir = runs("eagle")
    assert generate.main(prompt + ["--heads", str(heads_dir)]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["tokens"] == ar["tokens"] and spec["mean_accepted_tokens"] >= 1.0
    assert generate.main(prompt + ["--heads", str(heads_dir), "--tree", "dynamic:3,3,8"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == ar["tokens"]  # EAGLE-2 dynamic tree
    assert generate.main(prompt + ["--heads", str(heads_dir), "--tree", "dynamic:0,3,8"]) == 2
    assert "dynamic tree needs topk >= 1" in capsys.readouterr().err

    common = ["--model", str(base_dir), "--heads", str(heads_dir), "--prompt-len", "16", "--max-new-tokens", "16"]
    assert bench.main(common + ["--tune-tree"]) == 0
    tuning = json.loads((heads_dir / "tree_tuning.json").read_text())
    assert (heads_dir / "tree.json").is_file() and tuning["table"]
    # (a dynamic tree in infer.bench is infer.generate's, checked above: one compiled decoder fewer here)
    assert bench.main(common + ["--tree", "auto", "--num-prompts", "2", "--repeats", "1", "--temperatures", "0"]) == 0
    table = capsys.readouterr().out
    assert "| eagle | 0 |" in table  # one tree: the row takes the kind's name
    assert "| yes |" in table and "**no**" not in table
    assert generate.main(prompt + ["--tree", "chain"]) == 2  # --tree without --heads
