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


def test_heads_ship_in_bfloat16_and_load_as_the_rounded_weights(tmp_path):
    """Stored narrower, the floating weights load as their bfloat16 roundings (cast back to float32);
    the draft vocabulary's integer token map is kept exactly. Reshipping the shipped heads themselves works."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxaccel.heads import load_heads
    from jaxaccel.heads.registry import HeadParts

    config = tiny_model_dir(tmp_path / "a", 0)
    heads_config = HeadsConfig(kind="hydra", num_heads=2, prefix_layer=True, draft_vocab_size=64)
    heads = make_heads(heads_config, config, rngs=nnx.Rngs(3))
    d2t = np.random.default_rng(0).choice(config.vocab_size, 64, replace=False).astype(np.int32)
    heads.d2t[...] = jnp.asarray(d2t)
    save_heads(heads, tmp_path / "runs" / "hydra", tmp_path / "a")
    root = tmp_path / "pretrained"
    root.mkdir()
    ship_heads({"hydra": tmp_path / "runs" / "hydra"}, root / "tiny-a", ["c"], title="t")
    full = (root / "tiny-a" / "heads" / "hydra" / "heads.safetensors").stat().st_size
    manifest = ship_heads({"hydra": root / "tiny-a" / "heads" / "hydra"}, root / "tiny-a", ["c"], title="t",
                          store_dtype="bfloat16")
    shipped = root / "tiny-a" / "heads" / "hydra"
    assert manifest["store_dtype"] == "bfloat16" and "stored in bfloat16" in (root / "tiny-a" / "README.md").read_text()
    assert (shipped / "heads.safetensors").stat().st_size < 0.6 * full
    assert auto_heads(tmp_path / "a", root) == [shipped]  # the manifest's hashes are of the narrowed file
    parts = HeadParts(heads_config, config)
    want, got = parts.params(heads), parts.params(load_heads(shipped, tmp_path / "a"))
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        rounded = value.astype(jnp.bfloat16).astype(value.dtype) if jnp.issubdtype(value.dtype, jnp.floating) else value
        np.testing.assert_array_equal(jax.device_get(got[name]), jax.device_get(rounded), err_msg=name)
    np.testing.assert_array_equal(jax.device_get(got["d2t"]), d2t)
    for bad in ("int8", "bfloat61"):
        with pytest.raises(ValueError, match=f"floating dtype .*, got '{bad}'"):
            ship_heads({"hydra": shipped}, root / "tiny-a", ["c"], title="t", store_dtype=bad)
    assert auto_heads(tmp_path / "a", root) == [shipped]


@pytest.mark.parametrize("heads, message", [
    (["hydra"], "--heads takes KIND=DIR, got 'hydra'"),
    (["hydra=x", "hydra=y"], "names the kind 'hydra' twice"),
])
def test_ship_heads_cli_names_bad_input(tmp_path, capsys, heads, message):
    from train import ship_heads as cli

    (tmp_path / "commands.txt").write_text("python -m train.hydra ...\n")
    argv = ["--model", "smollm2-135m-instruct", "--commands", str(tmp_path / "commands.txt")]
    for spec in heads:
        argv += ["--heads", spec]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert cli.main(["--model", "no-such-model", "--heads", "a=b", "--commands", "c"]) == 2
    assert "unknown model name 'no-such-model'" in capsys.readouterr().err


def test_every_shipped_model_s_heads_are_intact_and_within_the_budget():
    from jaxaccel.pretrained.manifest import verify
    from jaxaccel.pretrained.shipped_heads import MAX_HEADS_BYTES, shipped_roots

    roots = {root.name: root for root in shipped_roots()}
    assert {"small", "smollm2-135m-instruct"} <= roots.keys()
    for name, root in roots.items():
        files = verify(root)["files"]
        heads_bytes = sum(f["bytes"] for rel, f in files.items() if rel.startswith("heads/"))
        assert 0 < heads_bytes <= MAX_HEADS_BYTES, name
    assert set(json.loads((roots["smollm2-135m-instruct"] / "MANIFEST.json").read_text())["heads_eval"]) == {
        "eagle3", "hydra"}
