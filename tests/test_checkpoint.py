"""Tests for jaxaccel.checkpoint: round trip, rotation, metadata guard, corruption, kill -9, sharding."""

import hashlib
import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxaccel.checkpoint import (
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    TrainCheckpointer,
    restore_or_init,
)

# Reads of deliberately corrupted files fail inside orbax's background coroutines, which
# then report "exception ignored" when garbage-collected (during whichever test runs).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

REPO = pathlib.Path(__file__).resolve().parents[1]
META = {"model": {"d_model": 8, "n_layers": 2}, "train": {"lr": 1e-3, "steps": 100}}


def make_state(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = {"w": jax.random.normal(k1, (4, 8)), "b": jax.random.normal(k2, (8,)).astype(jnp.bfloat16)}
    opt = optax.adamw(1e-3)
    opt_state = opt.init(params)
    # One real update so mu/nu/count are non-trivial.
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = opt.update(grads, opt_state, params)
    return {
        "params": params,
        "opt": opt_state,
        "step": jnp.int32(7),
        "rng": jax.random.key_data(jax.random.key(seed + 1)),
        "host_np": np.arange(5, dtype=np.float64),
        "epoch": 3,
    }


def assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def snapshot(directory):
    """{relative path: sha256 (files) or 'dir'} for everything under directory."""
    out = {}
    for p in sorted(pathlib.Path(directory).rglob("*")):
        rel = str(p.relative_to(directory))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def array_files(step_dir):
    return [p for p in pathlib.Path(step_dir).rglob("ocdbt.process_*/d/*") if p.is_file()]


def run_py(code, timeout=60):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- round trip


def test_round_trip_exact_and_restore_or_init(tmp_path):
    state = make_state()
    with TrainCheckpointer(tmp_path, metadata=META) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(10, state)
        ckpt.wait()
        assert ckpt.latest_step() == 10
        # A template of another value: the restored one must be the saved one, exactly.
        other = make_state(seed=5)
        assert_tree_equal(ckpt.restore(like=other), state)
        assert_tree_equal(ckpt.restore(10, like=other), state)
        assert not ckpt.save(10, state, force=True)  # already saved: no-op, not an error
        with pytest.raises(FileNotFoundError, match="step 3"):
            ckpt.restore(3, like=other)
        # A template that does not fit is a usage error, not corruption.
        bad = dict(other, params={"w": jnp.zeros((4, 9)), "b": other["params"]["b"]})
        with pytest.raises(ValueError, match=r"params\.w") as err:
            ckpt.restore(like=bad)
        assert not isinstance(err.value, CorruptCheckpointError)
        with pytest.raises(TypeError, match="key_data"):
            ckpt.save(11, dict(state, rng=jax.random.key(0)))

    with TrainCheckpointer(tmp_path, metadata=META) as ckpt:  # resume in a new "process"
        restored, start = restore_or_init(ckpt, lambda: make_state(seed=9), like=make_state(seed=9))
        assert start == 10
        assert_tree_equal(restored, state)

    with TrainCheckpointer(tmp_path / "fresh", metadata=META) as ckpt:
        fresh, start = restore_or_init(ckpt, lambda: make_state(seed=9))
        assert start == 0
        assert_tree_equal(fresh, make_state(seed=9))


def test_keeps_last_n_and_save_interval(tmp_path):
    state = {"x": jnp.arange(4.0), "step": jnp.int32(0)}
    with TrainCheckpointer(tmp_path, metadata=META, max_to_keep=2, save_interval_steps=5) as ckpt:
        written = [s for s in range(1, 21) if ckpt.save(s, dict(state, step=jnp.int32(s)))]
        assert written == [5, 10, 15, 20]
        assert ckpt.save(23, dict(state, step=jnp.int32(23)), force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [20, 23]
        assert int(ckpt.restore(20, like=state)["step"]) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["20", "23", "train_metadata.json"]


# --------------------------------------------------------------------------- metadata guard


def test_metadata_mismatch_raises_and_touches_nothing(tmp_path):
    with TrainCheckpointer(tmp_path, metadata=META) as ckpt:
        ckpt.save(1, {"x": jnp.ones(3)})
    # A half-written save of another run is also left alone on a refused open.
    (tmp_path / "2.orbax-checkpoint-tmp").mkdir()
    (tmp_path / "2.orbax-checkpoint-tmp" / "junk").write_bytes(b"partial")
    before = snapshot(tmp_path)

    changed = {"model": {"d_model": 16, "n_layers": 2}, "train": {"lr": 1e-3, "steps": 500}}
    with pytest.raises(IncompatibleCheckpointError) as err:
        TrainCheckpointer(tmp_path, metadata=changed)
    msg = str(err.value)
    assert "model.d_model" in msg and "8" in msg and "16" in msg and str(tmp_path) in msg
    assert err.value.differences == {"model.d_model": (8, 16), "train.steps": (100, 500)}
    with pytest.raises(IncompatibleCheckpointError, match="model.d_model") as err:
        TrainCheckpointer(tmp_path, metadata=changed, ignore_keys=("train.steps",))
    assert set(err.value.differences) == {"model.d_model"}
    with pytest.raises(IncompatibleCheckpointError, match="new_key"):
        TrainCheckpointer(tmp_path, metadata=dict(META, new_key=1))
    assert snapshot(tmp_path) == before

    # Keys allowed to differ: resume works; the file still describes the first run,
    # and the unfinished temporary directory is cleaned up now.
    extended = dict(META, train={"lr": 1e-3, "steps": 500})
    with TrainCheckpointer(tmp_path, metadata=extended, ignore_keys=("train.steps",)) as ckpt:
        assert ckpt.latest_step() == 1
    assert snapshot(tmp_path)["train_metadata.json"] == before["train_metadata.json"]
    assert '"steps": 100' in (tmp_path / "train_metadata.json").read_text()
    assert not (tmp_path / "2.orbax-checkpoint-tmp").exists()


def test_checkpoints_without_metadata_are_refused(tmp_path):
    with TrainCheckpointer(tmp_path, metadata=META) as ckpt:
        ckpt.save(1, {"x": jnp.ones(3)})
    (tmp_path / "train_metadata.json").unlink()
    before = snapshot(tmp_path)
    with pytest.raises(IncompatibleCheckpointError, match="train_metadata.json"):
        TrainCheckpointer(tmp_path, metadata=META)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_corrupt_latest_step(tmp_path, damage):
    like = {"w": jnp.zeros((64, 64)), "step": jnp.int32(0)}
    with TrainCheckpointer(tmp_path, metadata=META) as ckpt:
        for s in (1, 2):
            ckpt.save(s, {"w": jax.random.normal(jax.random.key(s), (64, 64)), "step": jnp.int32(s)})
    files = array_files(tmp_path / "2")
    assert files
    for f in files:
        data = f.read_bytes()
        if damage == "truncate":
            f.write_bytes(data[: len(data) // 2])
        elif damage == "delete":
            f.unlink()
    if damage == "flip":  # bytes of w's data changed in place: only the checksum notices
        f = max(files, key=lambda p: p.stat().st_size)
        data = bytearray(f.read_bytes())
        data[len(data) // 2: len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 8])
        f.write_bytes(bytes(data))
    before = snapshot(tmp_path)

    with TrainCheckpointer(tmp_path, metadata=META) as ckpt:
        assert ckpt.latest_step() == 2
        with pytest.raises(CorruptCheckpointError, match=r"step 2 .*is corrupt") as err:
            ckpt.restore(like=like)
        assert err.value.step == 2 and str(tmp_path) in str(err.value)
        if damage == "flip":
            assert "differ from what was saved in ['w']" in str(err.value)
        with pytest.raises(CorruptCheckpointError):
            ckpt.restore_latest(like, fallback=False)
        assert snapshot(tmp_path) == before  # nothing deleted or moved

        # Fallback: the intact step 1, and step 2 moved aside (kept) so saves go on.
        state, step = ckpt.restore_latest(like)
        assert step == 1 and int(state["step"]) == 1
        assert ckpt.all_steps() == [1]
        moved = tmp_path / "2.corrupt"
        assert {k.replace("2.corrupt", "2", 1): v for k, v in snapshot(moved.parent).items()
                if k.startswith("2.corrupt")} == {k: v for k, v in before.items() if k.startswith("2")}
        assert ckpt.save(2, state)
        ckpt.wait()
        assert int(ckpt.restore(like=like)["step"]) == 1


def test_all_steps_corrupt_raises_without_renaming(tmp_path):
    with TrainCheckpointer(tmp_path, metadata=META) as ckpt:
        ckpt.save(1, {"w": jnp.arange(4096.0)})
    for f in array_files(tmp_path / "1"):
        f.unlink()
    before = snapshot(tmp_path)
    with TrainCheckpointer(tmp_path, metadata=META) as ckpt:
        with pytest.raises(CorruptCheckpointError, match="step 1"):
            restore_or_init(ckpt, lambda: {"w": jnp.zeros(4096)})
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- kill -9 mid-save

_SAVER = """
import sys, jax, jax.numpy as jnp
from jaxaccel.checkpoint import TrainCheckpointer
base = jax.random.normal(jax.random.key(0), (2048, 2048))  # 16 MiB, incompressible
with TrainCheckpointer(sys.argv[1], metadata={"run": 1}, max_to_keep=2) as ckpt:
    for step in range(1, 10_000):
        ckpt.save(step, {"w": base + step, "step": jnp.int32(step)})
"""


def kill_saver_mid_save(directory):
    """Runs _SAVER until it has committed a step, then SIGKILLs it at a random moment
    while a save is in flight (a temporary directory exists)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(directory)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, first_commit, pause = time.time() + 60, None, random.uniform(0.0, 1.0)
        while time.time() < deadline and proc.poll() is None:
            if first_commit is None and any(p.name.isdigit() for p in directory.iterdir()):
                first_commit = time.time()
            if (first_commit is not None and time.time() - first_commit > pause
                    and any(directory.glob("*.orbax-checkpoint-tmp*"))):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_sigkill_mid_save_leaves_a_restorable_latest(tmp_path):
    for _ in range(3):  # the save may (rarely) commit between our look and the kill
        kill_saver_mid_save(tmp_path)
        leftovers = list(tmp_path.glob("*.orbax-checkpoint-tmp*"))
        if leftovers:
            break
    assert leftovers, "the kill should have landed inside a save"
    committed = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
    with TrainCheckpointer(tmp_path, metadata={"run": 1}, max_to_keep=2) as ckpt:
        latest = ckpt.latest_step()
        assert latest == committed[-1]
        assert max(int(p.name.split(".")[0]) for p in leftovers) > latest  # newer, half-written: skipped
        like = {"w": jax.ShapeDtypeStruct((2048, 2048), jnp.float32), "step": jnp.int32(0)}
        state, step = ckpt.restore_latest(like, fallback=False)
        assert step == latest and int(state["step"]) == latest
        base = jax.random.normal(jax.random.key(0), (2048, 2048))
        np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(base + latest))
        # Unfinished saves are gone, and saving goes on from there.
        assert not list(tmp_path.glob("*.orbax-checkpoint-tmp*"))
        assert ckpt.save(latest + 1, state)


# --------------------------------------------------------------------------- shardings


def test_restore_onto_template_shardings_8_devices(tmp_path):
    result = run_py(f"""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import jax, jax.numpy as jnp, numpy as np, optax
        from jax.sharding import NamedSharding, PartitionSpec as P
        from jaxaccel.checkpoint import TrainCheckpointer, restore_or_init
        assert jax.device_count() == 8, jax.devices()
        mesh = jax.make_mesh((2, 4), ("data", "model"))
        shard = {{"w": NamedSharding(mesh, P("data", "model")), "b": NamedSharding(mesh, P("model"))}}

        @jax.jit
        def init_plain():
            params = {{"w": jnp.arange(64.0).reshape(8, 8), "b": jnp.arange(8.0)}}
            return {{"params": params, "opt": optax.adam(1e-3).init(params)}}

        # Saved from one device, restored onto a 2x4 mesh via a ShapeDtypeStruct template.
        state = init_plain()
        with TrainCheckpointer({str(tmp_path)!r}, metadata={{"m": 1}}) as ckpt:
            ckpt.save(5, state)
        sharded_init = jax.jit(init_plain, out_shardings={{
            "params": shard, "opt": (optax.ScaleByAdamState(
                count=NamedSharding(mesh, P()), mu=shard, nu=shard), optax.EmptyState())}})
        like = jax.eval_shape(sharded_init)
        with TrainCheckpointer({str(tmp_path)!r}, metadata={{"m": 1}}) as ckpt:
            got = ckpt.restore(like=like)
            for a, t, ref in zip(jax.tree.leaves(got), jax.tree.leaves(like), jax.tree.leaves(state)):
                assert a.sharding == t.sharding, (a.sharding, t.sharding)
                np.testing.assert_array_equal(np.asarray(a), np.asarray(ref))
            assert len(got["params"]["w"].addressable_shards) == 8
            assert got["params"]["w"].addressable_shards[0].data.shape == (4, 2)
            # restore_or_init takes the template from jax.eval_shape(init_fn).
            got2, start = restore_or_init(ckpt, sharded_init)
            assert start == 5 and got2["params"]["b"].sharding == shard["b"]
            # Sharded arrays save and verify too (checksums computed on device).
            assert ckpt.save(6, got2)
            ckpt.wait()
            got3 = ckpt.restore(6, like=like)
            assert got3["params"]["w"].sharding == shard["w"]
        print("OK")
    """)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-4000:]


def test_checksum_same_on_host_and_device_and_position_sensitive():
    from jaxaccel.checkpoint import _checksums

    x = jax.random.normal(jax.random.key(0), (3, 5, 7))
    tree = {"f32": x, "bf16": x.astype(jnp.bfloat16), "i8": (x * 9).astype(jnp.int8),
            "bool": x > 0, "scalar": jnp.float32(2.5)}
    on_host = jax.tree.map(np.asarray, tree)
    assert _checksums(tree) == _checksums(on_host)
    swapped = dict(tree, f32=x[::-1])  # same values, other order
    assert _checksums(swapped)["f32"] != _checksums(tree)["f32"]
