"""python -m train.pretrain on the tiny preset: end to end, 1 vs 8 devices, kill -9 and resume, bad input."""

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
import torch
import transformers

from jaxaccel import load_hf
from jaxaccel.presets import get_preset
from jaxaccel.sharding import make_mesh
from jaxaccel.training import Pretraining, lr_schedule, read_metrics
from train import pretrain as cli
from train.common import EXIT_BAD_INPUT

REPO = pathlib.Path(__file__).resolve().parents[1]
# The run the fixture makes and the killed run repeat: long enough that a kill lands mid-run.
RUN_ARGS = ["--preset", "tiny", "--steps", "120", "--checkpoint-every", "10", "--eval-every", "40", "--no-progress"]


def losses(run_dir):
    """{step: loss}; fails if a step is logged twice."""
    records = [r for r in read_metrics(pathlib.Path(run_dir) / "metrics.jsonl") if "loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in records}


def snapshot(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(pathlib.Path(directory).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert cli.main(RUN_ARGS + ["--out", str(out)]) == 0
    return out


def test_end_to_end_metrics_checkpoints_export(tiny_run):
    by_step = losses(tiny_run)
    assert sorted(by_step) == list(range(1, 121))
    assert np.mean([by_step[s] for s in range(111, 121)]) < by_step[1] - 0.8  # it learns
    records = read_metrics(tiny_run / "metrics.jsonl")
    assert [r["step"] for r in records if "val_loss" in r] == [40, 80, 120]
    assert all(0 < r["val_bits_per_byte"] < 8 for r in records if "val_loss" in r)
    test = json.loads((tiny_run / "eval.json").read_text())
    assert test["split"] == "test" and test["step"] == 120 and 0 < test["bits_per_byte"] < 8
    assert [r["test_bits_per_byte"] for r in records if "test_bits_per_byte" in r] == [test["bits_per_byte"]]
    assert list((tiny_run / "tb").glob("events.out.tfevents.*"))
    ckpts = tiny_run / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [100, 110, 120]  # keeps 3

    # The export loads in jaxaccel and in transformers, with the same logits.
    model_dir = tiny_run / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in model_dir.iterdir()}
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    text = "def add(a, b):\n    return a + b  # ünïcode\n"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    ours = np.asarray(load_hf(model_dir)(np.asarray([ids], np.int32)))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_lr_schedule_warmup_then_cosine():
    schedule = lr_schedule(1e-3, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lrs = np.array([float(schedule(s)) for s in range(101)])
    assert lrs[0] == 0 and lrs[10] == pytest.approx(1e-3)
    assert np.all(np.diff(lrs[:11]) > 0) and np.all(np.diff(lrs[10:]) <= 0)
    assert lrs[100] == pytest.approx(1e-4)


def test_eight_devices_match_one(tmp_path):
    """Data-parallel + FSDP on 8 emulated devices (with 2 accumulation micro-batches) follows the
    single-device loss curve."""
    preset = get_preset("tiny")
    train = preset.train.replace(steps=6, batch_size=16, eval_every=0)
    curves = {}
    for name, mesh_spec, devices, accum in [("one", "data=1", jax.devices()[:1], 1),
                                            ("eight", "data=2,fsdp=4", jax.devices(), 2)]:
        mesh = make_mesh(mesh_spec, devices=devices)
        with Pretraining(preset.model, train.replace(accum_steps=accum), tmp_path / name, mesh=mesh) as run:
            if name == "eight":  # really sharded: weights over fsdp, the batch over all 8 devices
                kernel = run.state["params"]["layers.0.mlp.up_proj.kernel"]
                assert kernel.addressable_shards[0].data.shape == (64 // 4, 192)
                assert run.batch(0).addressable_shards[0].data.shape == (2, 1, 65)
            logged = {}
            run.train(lambda step, m: logged.update({step: m}) if "loss" in m else None)
            # grad_norm too: Adam would hide a wrongly scaled (summed) accumulated gradient.
            curves[name] = [(logged[s]["loss"], logged[s]["grad_norm"]) for s in range(1, 7)]
    assert curves["one"][-1][0] < curves["one"][0][0]
    np.testing.assert_allclose(curves["eight"], curves["one"], rtol=2e-5, atol=2e-5)


def run_cli(out, *extra, **popen):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")  # XLA_FLAGS: 8 devices, as here
    return subprocess.Popen([sys.executable, "-m", "train.pretrain", *RUN_ARGS, "--out", str(out), *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_sigkill_then_resume_matches_uninterrupted(tiny_run, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(out)
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
    assert killed_at < 120 and not (out / "model").exists(), "the kill should land mid-run"

    resumed = run_cli(out)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"resuming from step {killed_at}" in stderr
    expected, got = losses(tiny_run), losses(out)
    assert sorted(got) == list(range(1, 121))
    np.testing.assert_allclose([got[s] for s in range(1, 121)], [expected[s] for s in range(1, 121)],
                               rtol=0, atol=1e-6)
    assert json.loads((out / "eval.json").read_text())["bits_per_byte"] == pytest.approx(
        json.loads((tiny_run / "eval.json").read_text())["bits_per_byte"], abs=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--set", "hidden_size=96"], "model.hidden_size: checkpoint has 64, this run has 96"),
    (["--lr", "0.5"], "train.lr"),
    (["--set", "hidden_sise=96"], "unknown model config field 'hidden_sise'"),
    (["--set", "num_layers=two"], "num_layers"),
    (["--extra-data", "/no/such/corpus"], "corpus directory does not exist: /no/such/corpus"),
])
def test_bad_input_is_one_line_and_keeps_checkpoints(tiny_run, capsys, args, message):
    before = snapshot(tiny_run)
    assert cli.main(RUN_ARGS + ["--out", str(tiny_run), *args]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert snapshot(tiny_run) == before


def test_missing_corpus_creates_nothing(tmp_path):
    proc = run_cli(tmp_path / "run", "--extra-data", str(tmp_path / "missing"))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT
    assert stderr.strip() == f"error: corpus directory does not exist: {tmp_path / 'missing'}"
    assert not (tmp_path / "run").exists()
