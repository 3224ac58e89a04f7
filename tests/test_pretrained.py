"""The shipped files: intact and loadable; shipping a run copies only what runs, with the commands
that made it; a damaged copy is reported file by file."""

import dataclasses
import json
import shutil
import subprocess

import pytest
from flax import nnx

from jaxaccel import Transformer, save_hf
from jaxaccel.checkpoint import METADATA_FILE
from jaxaccel.heads import HeadsConfig, load_heads, make_heads, save_heads
from jaxaccel.pretrained import MAX_BYTES, SHIPPED_DIR, ShippedFilesError, rebuild, ship, shipped_heads_dirs, verify
from jaxaccel.pretrained.manifest import MANIFEST_FILE, file_sha256
from jaxaccel.pretrained.provenance import ProvenanceError
from jaxaccel.presets import get_preset
from jaxaccel.training.distill import DistillConfig


def test_the_shipped_files_are_intact_within_budget_and_belong_together():
    manifest = verify(SHIPPED_DIR)
    assert manifest["total_bytes"] == sum(f["bytes"] for f in manifest["files"].values()) <= MAX_BYTES
    assert manifest["commands"][0].startswith("python -m train.pretrain --preset small")
    assert not any(part in rel for rel in manifest["files"] for part in ("checkpoints/", "data/", "tb/"))
    for heads_dir in shipped_heads_dirs():  # the heads' fingerprint matches the shipped base
        assert load_heads(heads_dir, SHIPPED_DIR / "model").config.kind == heads_dir.name


@pytest.fixture
def run_dir(tmp_path):
    """A run directory as train.pretrain and train.heads leave it, with a tiny random model."""
    run = tmp_path / "runs" / "tiny"
    preset = get_preset("tiny")
    model_config = preset.model.replace(eos_token_id=0)  # pretraining sets it from the tokenizer
    save_hf(Transformer(model_config, rngs=nnx.Rngs(0)), run / "model")
    shutil.copyfile(SHIPPED_DIR / "model" / "tokenizer.json", run / "model" / "tokenizer.json")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / METADATA_FILE).write_text(json.dumps(
        {"data": {"extra_dirs": [], "include_stdlib": True}, "model": model_config.to_dict(),
         "train": preset.train.replace(steps=60, lr=1e-3).to_dict()}))
    (run / "eval.json").write_text(json.dumps({"bits_per_byte": 3.5, "loss": 2.0}))
    heads_config = HeadsConfig(kind="hydra", num_heads=2, prefix_layer=True)
    heads_dir = run / "heads" / "hydra"
    save_heads(make_heads(heads_config, model_config, rngs=nnx.Rngs(1)), heads_dir, run / "model")
    for junk in ("checkpoints/1/state", "data/train.npy", "tb/events"):  # by-products that must stay behind
        (heads_dir / junk).parent.mkdir(parents=True, exist_ok=True)
        (heads_dir / junk).write_text("by-product")
    (heads_dir / "checkpoints" / METADATA_FILE).write_text(json.dumps(
        {"data": {"extra_dirs": [], "include_stdlib": True}, "heads": heads_config.to_dict(),
         "train": dataclasses.asdict(DistillConfig(steps=500, batch_size=8, seq_len=32))}))
    (heads_dir / "eval.json").write_text(json.dumps({"step": 40, "depths": [], "mean_accepted_chain": 1.0}))
    (heads_dir / "tree.json").write_text(json.dumps({"paths": [[0], [0, 0]]}))
    return run


def test_ship_copies_only_the_files_that_run_with_their_commands_and_sums(run_dir, tmp_path):
    dest = tmp_path / "shipped"
    manifest = ship(run_dir, dest, ["hydra"])
    shipped = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert shipped == sorted(["MANIFEST.json", "README.md", "heads/hydra/eval.json", "heads/hydra/heads.safetensors",
                              "heads/hydra/heads_config.json", "heads/hydra/tree.json", "model/config.json",
                              "model/model.safetensors", "model/tokenizer.json"])
    for rel, entry in manifest["files"].items():
        assert entry["sha256"] == file_sha256(dest / rel) == file_sha256(run_dir / rel)
    run = run_dir.as_posix()
    assert manifest["commands"] == [
        f"python -m train.pretrain --preset tiny --out {run} --lr 0.001 --steps 60",
        f"python -m train.heads --base {run}/model --kind hydra --out {run}/heads/hydra --num-heads 2 --prefix-layer "
        f"--batch-size 8 --seq-len 32 --steps 40",  # the exported heads' step, not the configured 500
        f"python -m infer.bench --model {run}/model --heads {run}/heads/hydra --tune-tree --max-new-tokens 128"]
    readme = (dest / "README.md").read_text()
    assert all(c in readme for c in manifest["commands"]) and manifest["files"]["model/model.safetensors"]["sha256"] in readme
    assert verify(dest) == json.loads((dest / MANIFEST_FILE).read_text())
    load_heads(dest / "heads" / "hydra", dest / "model")  # the copies still belong together


def test_ship_refuses_what_it_cannot_reproduce_or_afford_and_leaves_the_old_files(run_dir, tmp_path):
    dest = tmp_path / "shipped"
    ship(run_dir, dest, ["hydra"])
    before = {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="exceeds the budget"):
        ship(run_dir, dest, ["hydra"], max_bytes=1000)
    with pytest.raises(FileNotFoundError, match="eagle has no heads.safetensors"):
        ship(run_dir, dest, ["eagle"])
    (run_dir / "heads" / "hydra" / "checkpoints" / METADATA_FILE).unlink()
    with pytest.raises(ProvenanceError, match="command that made it is unknown"):
        ship(run_dir, dest, ["hydra"])
    assert {p: p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("damage, message", [
    ("flip", "heads/hydra/heads.safetensors is corrupt"),
    ("truncate", "model/model.safetensors has"),
    ("delete", "model/config.json is missing"),
    ("lfs", "model/model.safetensors is a Git LFS pointer"),
    ("manifest", "MANIFEST.json is missing"),
])
def test_verify_names_each_damaged_file(run_dir, tmp_path, damage, message):
    dest = tmp_path / "shipped"
    ship(run_dir, dest, ["hydra"])
    if damage == "flip":
        path = dest / "heads" / "hydra" / "heads.safetensors"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path = dest / "model" / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "delete":
        (dest / "model" / "config.json").unlink()
    elif damage == "lfs":
        (dest / "model" / "model.safetensors").write_text(
            "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 123\n")
    else:
        (dest / MANIFEST_FILE).unlink()
    with pytest.raises(ShippedFilesError, match=message):
        verify(dest)


def test_rebuild_runs_the_recorded_commands_on_the_new_run_directory(tmp_path):
    calls = []
    rebuild(["python -m train.pretrain --preset small --out runs/small",
             "python -m train.heads --base runs/small/model --out runs/small/heads/eagle --kind eagle"],
            "runs/small", tmp_path / "again", cwd=tmp_path, run=lambda argv, **kw: calls.append((argv, kw)))
    again = (tmp_path / "again").as_posix()
    assert [argv[1:] for argv, _ in calls] == [
        ["-m", "train.pretrain", "--preset", "small", "--out", again],
        ["-m", "train.heads", "--base", f"{again}/model", "--out", f"{again}/heads/eagle", "--kind", "eagle"]]
    assert all(kw == {"cwd": tmp_path, "check": True} for _, kw in calls)


def test_demo_train_reruns_the_manifest_commands_then_ships_the_new_run(run_dir, tmp_path, monkeypatch):
    from infer import demo

    dest = tmp_path / "shipped"
    old = ship(run_dir, dest, ["hydra"])
    again = tmp_path / "again"
    ran = []

    def fake_run(argv, **kw):  # "training" = the fixture's run reappearing in the new directory
        ran.append(argv[1:])
        if argv[1:3] == ["-m", "train.pretrain"]:
            shutil.copytree(run_dir, again)

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert demo.main(["--train", "--run-dir", str(again), "--shipped-dir", str(dest), "--kinds", "hydra"]) == 0
    assert [" ".join(argv) for argv in ran] == [c.replace(run_dir.as_posix(), again.as_posix())[len("python "):]
                                               for c in old["commands"]]
    new = verify(dest)
    assert new["run_dir"] == again.as_posix() and new["files"] == old["files"]
