"""Heads shipped for a named model: `--heads auto` finds them by the model's weights, checks every
file first, and says which models have heads when this one has none; shipping is all or nothing."""

import json

import pytest
from flax import nnx

from jaxaccel import Transformer, save_hf
from jaxaccel.heads import HeadsConfig, make_heads, save_heads
from jaxaccel.pretrained import ShippedFilesError
from jaxaccel.pretrained.shipped_heads import auto_heads, resolve_heads, ship_heads
from jaxaccel.presets import get_preset


def tiny_model_dir(path, seed):
    config = get_preset("tiny").model
    save_hf(Transformer(config, rngs=nnx.Rngs(seed)), path)
    return config


@pytest.fixture
def shipped(tmp_path):
    """A pretrained root with heads for model A, and two model directories A and B (other weights)."""
    config = tiny_model_dir(tmp_path / "a", 0)
    tiny_model_dir(tmp_path / "b", 1)
    heads_dir = tmp_path / "runs" / "hydra"
    save_heads(make_heads(HeadsConfig(kind="hydra", num_heads=2), config, rngs=nnx.Rngs(2)), heads_dir, tmp_path / "a")
    (heads_dir / "eval.json").write_text(json.dumps({"mean_accepted_chain": 1.5}))
    root = tmp_path / "pretrained"
    root.mkdir()
    manifest = ship_heads({"hydra": heads_dir}, root / "tiny-a", ["python -m train.heads ..."], title="tiny heads")
    return tmp_path, root, manifest


def test_auto_finds_the_heads_of_the_model_by_its_weights(shipped):
    tmp, root, manifest = shipped
    assert auto_heads(tmp / "a", root) == [root / "tiny-a" / "heads" / "hydra"]
    assert manifest["heads_eval"] == {"hydra": {"mean_accepted_chain": 1.5}}
    assert set(manifest["files"]) == {"heads/hydra/heads.safetensors", "heads/hydra/heads_config.json",
                                      "heads/hydra/eval.json"}
    assert "python -m train.heads ..." in (root / "tiny-a" / "README.md").read_text()
    with pytest.raises(FileNotFoundError, match=r"no shipped draft heads .*\(heads ship for: tiny-a\)"):
        auto_heads(tmp / "b", root)


def test_auto_reports_a_damaged_file_by_name(shipped):
    tmp, root, _ = shipped
    weights = root / "tiny-a" / "heads" / "hydra" / "heads.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ShippedFilesError, match="heads/hydra/heads.safetensors is corrupt"):
        auto_heads(tmp / "a", root)


def test_resolve_heads_expands_auto_and_keeps_directories(shipped):
    tmp, root, _ = shipped
    assert resolve_heads(["auto", tmp / "x"], tmp / "a", root) == [root / "tiny-a" / "heads" / "hydra", tmp / "x"]


def test_shipping_over_budget_or_incomplete_changes_nothing(shipped):
    tmp, root, manifest = shipped
    heads_dir = tmp / "runs" / "hydra"
    with pytest.raises(ValueError, match="exceeds the budget"):
        ship_heads({"hydra": heads_dir}, root / "tiny-a", [], title="t", max_bytes=100)
    (tmp / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no heads.safetensors"):
        ship_heads({"hydra": tmp / "empty"}, root / "tiny-a", [], title="t")
    assert json.loads((root / "tiny-a" / "MANIFEST.json").read_text()) == manifest


def test_auto_on_the_shipped_small_model_is_its_shipped_heads():
    from jaxaccel.pretrained import SHIPPED_DIR, shipped_heads_dirs

    assert resolve_heads(["auto"], SHIPPED_DIR / "model") == shipped_heads_dirs()
