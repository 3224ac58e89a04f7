"""Training-state checkpoints: save, restore and resume, with orbax.

The one way this project checkpoints (pretraining, draft-head distillation,
gate optimisation)::

    ckpt = TrainCheckpointer(run_dir / "checkpoints", metadata={"model": ...,
                             "train": {...}}, ignore_keys=("train.steps",))
    with ckpt:
        state, start = restore_or_init(ckpt, init_state)   # init_state: jitted
        for step in range(start, total):
            state = train_step(state, batch)
            if (step + 1) % every == 0:
                ckpt.save(step + 1, state)
        ckpt.save(total, state)        # no-op if step `total` is already saved

`state` is any pytree of jax arrays, numpy arrays and Python scalars (params,
optax state, step counter, RNG key as raw ``jax.random.key_data``). A checkpoint
at step ``s`` holds the state after ``s`` training steps, so training resumes at
``s``.

On disk (``directory/``)::

    train_metadata.json           run metadata: written (temp file + rename) while
                                  no step is committed, then never rewritten
    <step>/state/                 one committed orbax checkpoint per step
    <step>.orbax-checkpoint-tmp   a save in progress, or one killed mid-way
    <step>.corrupt                a corrupt step moved aside by a fallback

Safety properties:

* Atomic saves: orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it to
  ``<step>`` only once every file is written, so a process killed mid-save
  leaves a temporary directory that is never listed as a step (never "latest")
  and is removed when the next checkpointer opens the directory.
* Run metadata must match to resume; a mismatch raises
  :class:`IncompatibleCheckpointError` before anything in the directory is
  touched.
* Every save records a position-weighted checksum of each leaf in the step's
  orbax metadata; restore recomputes it. A checkpoint that cannot be read
  (truncated or deleted file) or whose bytes changed raises
  :class:`CorruptCheckpointError` naming the step and the directory. Nothing
  is ever deleted except by orbax's ``max_to_keep`` rotation and its removal
  of unfinished temporary directories.
* ``restore_latest(fallback=True)`` (and :func:`restore_or_init`) fall back to
  the newest intact step with a warning; the corrupt newer steps are renamed
  to ``<step>.corrupt`` (kept for inspection, never deleted) so that new saves
  are not shadowed by them.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxaccel.files import write_json_atomically

log = logging.getLogger(__name__)

METADATA_FILE = "train_metadata.json"
_CORRUPT_SUFFIX = ".corrupt"
_MISSING = "<missing>"
_ITEM = "state"  # step dirs hold <step>/state/


class IncompatibleCheckpointError(ValueError):
    """Existing checkpoints were written by a run with different metadata.

    ``differences`` maps each differing (dotted) key to ``(old, new)``.
    """

    def __init__(self, directory: os.PathLike | str, differences: Mapping[str, tuple[Any, Any]],
                 note: str = ""):
        self.directory = pathlib.Path(directory)
        self.differences = dict(differences)
        lines = [f"  {k}: checkpoint has {old!r}, this run has {new!r}"
                 for k, (old, new) in sorted(self.differences.items())]
        super().__init__(
            f"Checkpoints in {self.directory} are incompatible with this run"
            f"{note}:\n" + "\n".join(lines) + "\nNothing was changed in the directory. "
            "Use another directory, or pass the keys that may differ in ignore_keys.")


class CorruptCheckpointError(RuntimeError):
    """A committed checkpoint step cannot be read back intact."""

    def __init__(self, step: int, directory: os.PathLike | str, reason: str):
        self.step = step
        self.directory = pathlib.Path(directory)
        super().__init__(
            f"Checkpoint step {step} in {self.directory} is corrupt: {reason}\n"
            f"Nothing was deleted. Inspect or move away {self.directory / str(step)} "
            "to resume from an earlier step.")


# --------------------------------------------------------------------------- metadata


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b": leaf}, so differences name the exact field."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _metadata_differences(old: Mapping[str, Any], new: Mapping[str, Any],
                          ignore_keys: Iterable[str]) -> dict[str, tuple[Any, Any]]:
    old_f, new_f = _flatten(old), _flatten(new)
    ignore = tuple(ignore_keys)

    def ignored(key: str) -> bool:  # "train" ignores "train.steps" too
        return any(key == i or key.startswith(i + ".") for i in ignore)

    return {k: (old_f.get(k, _MISSING), new_f.get(k, _MISSING))
            for k in sorted(old_f.keys() | new_f.keys())
            if not ignored(k) and old_f.get(k, _MISSING) != new_f.get(k, _MISSING)}


# --------------------------------------------------------------------------- checksums
# zstd-compressed tensorstore chunks carry no checksum: a flipped byte restores
# silently as a wrong value. A position-weighted uint32 sum per leaf, computed on
# device (so sharded arrays are never gathered), catches that.


def _checksum_jnp(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        u = x.astype(jnp.uint32)
    else:
        word = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
        u = jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)
    # C-order flat index from iotas rather than reshape(-1): no resharding.
    idx = jnp.zeros(u.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(u.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, u.shape, dim) * jnp.uint32(stride % 2**32)
        stride *= u.shape[dim]
    return jnp.sum(u * (idx * 2 + 1), dtype=jnp.uint32)  # wraps mod 2**32


def _checksum_np(x: Any) -> int:
    x = np.ascontiguousarray(np.asarray(x))
    if x.dtype == np.bool_:
        u = x.astype(np.uint32)
    else:
        word = {1: np.uint8, 2: np.uint16}.get(x.dtype.itemsize, np.uint32)
        u = x.view(word).astype(np.uint32)
    idx = (np.arange(u.size, dtype=np.uint64) % 2**32).astype(np.uint32).reshape(u.shape)
    return int(np.sum(u * (idx * np.uint32(2) + np.uint32(1)), dtype=np.uint32))


_checksums_on_device = jax.jit(lambda leaves: [_checksum_jnp(x) for x in leaves])


def _named_leaves(tree: Any) -> dict[str, Any]:
    """Leaves keyed by orbax's parameter names ("opt.0.mu.w"); empty nodes dropped."""
    names = ocp.tree.get_param_names(tree, include_empty_nodes=False)
    return dict(zip(jax.tree.leaves(names), jax.tree.leaves(tree)))


def _checksums(tree: Any) -> dict[str, int]:
    leaves = _named_leaves(tree)
    on_device = {k: v for k, v in leaves.items() if isinstance(v, jax.Array)}
    sums = {k: _checksum_np(v) for k, v in leaves.items() if k not in on_device}
    values = jax.device_get(_checksums_on_device(list(on_device.values())))
    sums.update({k: int(v) for k, v in zip(on_device, values)})
    return sums


# --------------------------------------------------------------------------- checkpointer


class TrainCheckpointer:
    """Saves and restores a training-state pytree under ``directory``.

    Args:
      directory: e.g. ``RUN_DIR/checkpoints``; created if missing.
      metadata: JSON-serialisable dict (model config, hyper-parameters) that
        must match the one stored with existing checkpoints to resume. Nested
        dicts are compared field by field ("train.lr").
      ignore_keys: dotted keys (or prefixes) allowed to differ on resume, e.g.
        ``("train.steps",)`` to extend a run.
      max_to_keep: keep only the newest N steps (None keeps all).
      save_interval_steps: ``save`` writes only at multiples of this (or when
        ``force=True``); 1 means every call writes.
      async_save: return from ``save`` once arrays are copied to host, writing
        files in the background (``wait``/``close`` block until done).

    Raises:
      IncompatibleCheckpointError: the directory holds checkpoints and their
        metadata differs (or is missing); nothing is changed on disk.
    """

    def __init__(self, directory: os.PathLike | str, *, metadata: Mapping[str, Any],
                 ignore_keys: Iterable[str] = (), max_to_keep: int | None = 3,
                 save_interval_steps: int = 1, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self.metadata = json.loads(json.dumps(dict(metadata)))  # fail early if not JSON
        self._check_or_write_metadata(tuple(ignore_keys))
        # Only now may orbax touch the directory (it removes unfinished temp dirs).
        options = ocp.CheckpointManagerOptions(
            # Orbax's default also saves the first step seen; we save only at multiples
            # of K (or force=True), plus at a preemption notice on pods.
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy([
                ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
                ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
            ]),
            preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        # The state is one named item: registered up front, a fresh manager can read
        # a step's metadata before anything was saved or restored through it.
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add(_ITEM, ocp.args.StandardSave)
        registry.add(_ITEM, ocp.args.StandardRestore)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              handler_registry=registry)

    def _check_or_write_metadata(self, ignore_keys: tuple[str, ...]) -> None:
        path = self.directory / METADATA_FILE
        # The manager's own step-name format: temporary (unfinished) saves don't count.
        steps = [m.step for m in ocp.step.standard_name_format().find_all(self.directory)]
        if steps:
            if not path.exists():
                raise IncompatibleCheckpointError(
                    self.directory, {METADATA_FILE: (_MISSING, "<this run's metadata>")},
                    note=f" (it holds steps {sorted(steps)} but no {METADATA_FILE})")
            old = json.loads(path.read_text())
            diff = _metadata_differences(old, self.metadata, ignore_keys)
            if diff:
                raise IncompatibleCheckpointError(self.directory, diff)
            return  # written once: the file keeps describing the run that created it
        # No committed step yet: nothing to resume, (over)write this run's metadata.
        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_json_atomically(path, self.metadata, sort_keys=True)

    # -- queries

    def all_steps(self) -> list[int]:
        """Committed steps, ascending (unfinished temporary saves excluded)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        return self._manager.latest_step()

    # -- save

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Saves ``state`` as ``step``; returns whether a checkpoint was written.

        Skipped (False) when ``step`` is not a multiple of ``save_interval_steps``
        (unless ``force``) or when ``step <= latest_step()``, so a final
        ``save(total, state, force=True)`` is safe after a periodic save at
        ``total``. With ``async_save`` the files are written in the background;
        ``state`` may be donated/overwritten as soon as this returns.
        """
        if self.latest_step() is not None and step <= self.latest_step():
            if step not in self._manager.all_steps():
                log.warning("Not saving step %d: %s already holds later step %d.",
                            step, self.directory, self.latest_step())
            return False
        if not force and not self._manager.should_save(step):
            return False
        for leaf in jax.tree.leaves(state):
            if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                raise TypeError("Save RNG keys as raw data: jax.random.key_data(key); "
                                "restore with jax.random.wrap_key_data.")
        return self._manager.save(
            step, args=ocp.args.Composite(**{_ITEM: ocp.args.StandardSave(state)}), force=force,
            custom_metadata={"checksums": _checksums(state)})

    def wait(self) -> None:
        """Blocks until background saves (and old-step deletions) are finished."""
        self._manager.wait_until_finished()
        # Orbax removes unfinished temp dirs in the background and awaits that only
        # in save(); don't leave it running past close() (private, hence guarded).
        getattr(self._manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()

    # -- restore

    def restore(self, step: int | None = None, *, like: Any) -> Any:
        """Restores ``step`` (default: latest) into the structure of ``like``.

        ``like`` is a pytree of concrete arrays or ``jax.ShapeDtypeStruct`` (with
        ``sharding``) of the same structure, shapes and dtypes as the saved
        state; restored arrays get ``like``'s shardings (numpy / Python leaves
        come back as numpy / Python). No fallback to other steps.

        Raises:
          FileNotFoundError: no such committed step.
          ValueError: ``like`` does not match the saved structure/shapes/dtypes.
          CorruptCheckpointError: the step's files are unreadable or altered.
        """
        self.wait()  # a step being written in the background is not readable yet
        step = self.latest_step() if step is None else step
        if step is None or step not in self._manager.all_steps():
            raise FileNotFoundError(f"No checkpoint step {step} in {self.directory} "
                                    f"(committed steps: {self.all_steps()}).")
        saved = self._read_saved_metadata(step)
        self._check_template(step, like, saved[0])
        try:
            state = self._manager.restore(
                step, args=ocp.args.Composite(**{_ITEM: ocp.args.StandardRestore(like)}))[_ITEM]
        except MemoryError:
            raise
        except Exception as e:  # the template matched, so this is the data
            raise CorruptCheckpointError(step, self.directory,
                                         f"{type(e).__name__}: {str(e)[:500]}") from e
        self._verify_checksums(step, state, saved[1])
        return state

    def _read_saved_metadata(self, step: int) -> tuple[dict[str, Any], dict[str, int] | None]:
        """({name: array metadata}, {name: checksum} or None) of a saved step."""
        try:
            step_meta = self._manager.metadata(step)
            tree = step_meta.item_metadata[_ITEM].tree
            arrays = {m.name: m for m in jax.tree.leaves(tree)}
            custom = step_meta.custom_metadata or {}
        except Exception as e:
            raise CorruptCheckpointError(step, self.directory,
                                         f"cannot read its metadata ({type(e).__name__}: "
                                         f"{str(e)[:300]})") from e
        if not arrays:
            raise CorruptCheckpointError(step, self.directory, "it lists no arrays")
        return arrays, custom.get("checksums")

    def _check_template(self, step: int, like: Any, saved: dict[str, Any]) -> None:
        wanted = _named_leaves(like)
        problems = [f"missing from checkpoint: {k}" for k in wanted.keys() - saved.keys()]
        problems += [f"not in template: {k}" for k in saved.keys() - wanted.keys()]
        for k in wanted.keys() & saved.keys():
            leaf, meta = wanted[k], saved[k]
            if isinstance(leaf, (int, float, bool, complex)):
                continue  # Python scalars restore as saved
            if tuple(np.shape(leaf)) != tuple(meta.shape) or np.dtype(leaf.dtype) != np.dtype(meta.dtype):
                problems.append(f"{k}: checkpoint {np.dtype(meta.dtype).name}{tuple(meta.shape)}, "
                                f"template {np.dtype(leaf.dtype).name}{tuple(np.shape(leaf))}")
        if problems:
            raise ValueError(f"Template does not match checkpoint step {step} in "
                             f"{self.directory}:\n  " + "\n  ".join(sorted(problems)))

    def _verify_checksums(self, step: int, state: Any, expected: dict[str, int] | None) -> None:
        if expected is None:  # written by something else; nothing to compare with
            log.warning("Checkpoint step %d in %s has no checksums.", step, self.directory)
            return
        bad = sorted(k for k, v in _checksums(state).items() if expected.get(k) != v)
        if bad:
            raise CorruptCheckpointError(step, self.directory,
                                         f"contents differ from what was saved in {bad}")

    def restore_latest(self, like: Any, *, fallback: bool = True) -> tuple[Any, int] | None:
        """Restores the newest intact step: ``(state, step)``, or None if there is none.

        With ``fallback``, a corrupt newest step is skipped with a warning and
        the next older one tried; once an intact step is found, the corrupt
        newer steps are renamed to ``<step>.corrupt`` (kept, not deleted) so
        that they neither shadow new saves nor are picked again. If no step is
        intact, the newest step's CorruptCheckpointError is raised and nothing
        is renamed. Without ``fallback`` the newest step's error is raised.
        """
        self.wait()
        corrupt: list[CorruptCheckpointError] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state = self.restore(step, like=like)
            except CorruptCheckpointError as e:
                if not fallback:
                    raise
                log.warning("%s\nTrying an earlier step.", e)
                corrupt.append(e)
                continue
            for e in corrupt:
                self._quarantine(e.step)
            return state, step
        if corrupt:
            raise corrupt[0]
        return None

    def _quarantine(self, step: int) -> None:
        src = self.directory / str(step)
        dst = src.with_name(src.name + _CORRUPT_SUFFIX)
        n = 1
        while dst.exists():
            dst, n = src.with_name(f"{src.name}{_CORRUPT_SUFFIX}-{n}"), n + 1
        if jax.process_index() == 0:
            src.rename(dst)
            log.warning("Moved corrupt checkpoint %s to %s (not deleted).", src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"jaxaccel.checkpoint.quarantine.{step}")
        self._manager.reload()

    # -- lifetime

    def close(self) -> None:
        """Waits for background saves to finish, then releases orbax's resources."""
        self.wait()
        self._manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def restore_or_init(checkpointer: TrainCheckpointer, init_fn: Callable[[], Any], *,
                    like: Any = None, fallback: bool = True) -> tuple[Any, int]:
    """Resumes from the newest intact checkpoint, else starts fresh.

    Returns ``(state, start_step)``: the restored state and its step, or
    ``(init_fn(), 0)``. The restore template is ``like`` or, by default,
    ``jax.eval_shape(init_fn)`` (no memory spent); make ``init_fn`` a ``jax.jit``
    with ``out_shardings`` so that this template carries the shardings. States
    with numpy or Python leaves need ``like`` (eval_shape turns them into jax
    types). Corrupt newest steps are handled as in ``restore_latest``.
    """
    if checkpointer.latest_step() is not None:
        template = jax.eval_shape(init_fn) if like is None else like
        restored = checkpointer.restore_latest(template, fallback=fallback)
        if restored is not None:
            return restored
    return init_fn(), 0
