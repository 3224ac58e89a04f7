"""Base-model pretraining: one run in one directory, resumable.

    RUN/tokenizer.json      byte-level BPE trained on the train split (reused on resume)
    RUN/checkpoints/        orbax train states (params, optimizer state, step), the last few
    RUN/data/               cached token streams
    RUN/metrics.jsonl, RUN/tb/   written by the caller's MetricsLogger
    RUN/eval.json           final test-split evaluation
    RUN/model/              Hugging Face export

Batches are `jaxaccel.data.batch_at(seed, step)` and the state holds everything else that
changes, so a run resumed from a checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxaccel import data
from jaxaccel.checkpoint import TrainCheckpointer, restore_or_init
from jaxaccel.config import ModelConfig
from jaxaccel.files import write_json_atomically
from jaxaccel.hf import save_hf
from jaxaccel.sharding import batch_sharding, make_mesh
from jaxaccel.training import loop, optim
from jaxaccel.training.steps import (ModelParts, evaluate, init_state_fn, make_eval_step, make_train_step,
                                     put_global, tokens_sharding, train_state_shardings, within_mesh)


@dataclass(frozen=True)
class TrainConfig:
    """Pretraining hyper-parameters. batch_size is global (all devices) and per optimizer update."""

    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 256
    accum_steps: int = 1  # micro-batches per update (batch_size / accum_steps sequences each)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    seed: int = 0
    eval_every: int = 200  # validation every N steps and at the end (0: never)
    eval_windows: int = 64  # validation windows of seq_len per evaluation
    eval_batch_size: int = 16
    test_windows: int | None = None  # None: the whole test split
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    tokenizer_max_bytes: int | None = None  # train-split bytes the tokenizer learns from
    corpus_max_bytes: int | None = None  # cap on each split's text (tiny runs); None: all of it

    # May differ when a directory is resumed: they do not change the train state.
    RESUMABLE = ("steps", "eval_every", "eval_windows", "eval_batch_size", "test_windows",
                 "checkpoint_every", "keep_checkpoints")

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "accum_steps", "eval_windows", "eval_batch_size",
                     "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of accum_steps ({self.accum_steps})")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def replace(self, **overrides: Any) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown training field(s) {unknown}; known fields: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Pretraining:
    """A pretraining run in `out_dir`: built (and resumed from its latest checkpoint) on creation.

    Raises ValueError / FileNotFoundError for bad settings or a missing corpus directory, and
    jaxaccel.checkpoint.IncompatibleCheckpointError when `out_dir` holds checkpoints of
    another configuration; in all these cases nothing in `out_dir` is written.
    """

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, out_dir: str | os.PathLike, *,
                 mesh: Mesh | None = None, extra_dirs: Sequence[str | os.PathLike] = (),
                 include_stdlib: bool = True, cache_dir: str | os.PathLike | None = None):
        tc = self.train_config = train_config
        self.out_dir = Path(out_dir)
        self.mesh = mesh if mesh is not None else make_mesh()
        self.extra_dirs = [Path(d).absolute() for d in extra_dirs]
        self.include_stdlib = include_stdlib
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.out_dir / "data"
        if tc.seq_len > model_config.max_position_embeddings:
            raise ValueError(f"seq_len ({tc.seq_len}) exceeds the model's max_position_embeddings "
                             f"({model_config.max_position_embeddings})")
        batch_axes = batch_sharding(self.mesh).spec[0]
        batch_devices = math.prod(self.mesh.shape[a] for a in
                                  ((batch_axes,) if isinstance(batch_axes, str) else batch_axes or ()))
        micro = tc.batch_size // tc.accum_steps
        if micro % batch_devices:
            raise ValueError(f"the micro-batch (batch_size / accum_steps = {micro}) must be a multiple of the "
                             f"{batch_devices} devices that split the batch on mesh {dict(self.mesh.shape)}")
        self.eval_batch_size = -(-tc.eval_batch_size // batch_devices) * batch_devices
        for split in data.SPLITS:  # a missing or empty corpus fails here, before anything is written
            data.list_documents(split, self.extra_dirs, include_stdlib)

        tok_path = self.out_dir / "tokenizer.json"
        new_tokenizer = not tok_path.exists()
        if new_tokenizer:
            self.tokenizer = data.train_tokenizer(data.files_within_bytes(self._texts("train"), tc.corpus_max_bytes),
                                                  model_config.vocab_size, max_bytes=tc.tokenizer_max_bytes)
        else:
            self.tokenizer = data.load_tokenizer(tok_path)
        if self.tokenizer.get_vocab_size() > model_config.vocab_size:
            raise ValueError(f"{tok_path} has {self.tokenizer.get_vocab_size()} tokens, more than the model's "
                             f"vocab_size {model_config.vocab_size}")
        self.model_config = model_config.replace(eos_token_id=data.eos_id(self.tokenizer))
        metadata = {
            "model": self.model_config.to_dict(),
            "train": tc.to_dict(),
            "data": {"extra_dirs": [str(d) for d in self.extra_dirs], "include_stdlib": include_stdlib,
                     "tokenizer_sha1": data.tokenizer_hash(self.tokenizer)},
        }
        self.checkpointer = TrainCheckpointer(
            self.out_dir / "checkpoints", metadata=metadata, ignore_keys=[f"train.{k}" for k in tc.RESUMABLE],
            max_to_keep=tc.keep_checkpoints, save_interval_steps=tc.checkpoint_every or tc.steps)
        try:
            if new_tokenizer and jax.process_index() == 0:
                data.save_tokenizer(self.tokenizer, tok_path)
            self._build()
        except BaseException:
            self.checkpointer.close()
            raise

    # ------------------------------------------------------------------------------ setup

    def _texts(self, split: str) -> list[str]:
        return data.load_texts(split, self.extra_dirs, self.include_stdlib)

    def tokens(self, split: str) -> np.ndarray:
        """The split's flat token stream (cached in cache_dir unless the corpus is capped)."""
        cap = self.train_config.corpus_max_bytes
        if cap is None:
            return data.token_stream(self.tokenizer, split, self.cache_dir, self.extra_dirs, self.include_stdlib)
        return data.tokenize_documents(self.tokenizer, data.files_within_bytes(self._texts(split), cap))

    def _build(self) -> None:
        tc, mesh = self.train_config, self.mesh
        self.train_tokens = self.tokens("train")
        self.val_windows = data.eval_windows(self.tokens("validation"), tc.seq_len, tc.eval_windows)
        self.byte_lengths_v = data.token_byte_lengths(self.tokenizer)

        self.parts = ModelParts.transformer(self.model_config)
        self.schedule = optim.lr_schedule(tc.lr, tc.steps, tc.warmup_steps, tc.min_lr_ratio)
        optimizer = optim.make_optimizer(self.schedule, weight_decay=tc.weight_decay, clip_norm=tc.clip_norm,
                                         b1=tc.b1, b2=tc.b2)
        self.param_shardings = self.parts.shardings(mesh)
        abstract = jax.eval_shape(init_state_fn(self.parts, optimizer, tc.seed))
        self.state_shardings = train_state_shardings(abstract, self.param_shardings, mesh)
        init = init_state_fn(self.parts, optimizer, tc.seed, self.state_shardings)
        self.state, self.start_step = restore_or_init(self.checkpointer, init)
        if self.start_step > tc.steps:
            raise ValueError(f"{self.checkpointer.directory} holds step {self.start_step}, past --steps {tc.steps}")
        self.train_sharding = tokens_sharding(mesh, 3)
        self.eval_sharding = tokens_sharding(mesh, 2)
        self.train_step = make_train_step(self.parts, optimizer, self.schedule, self.state_shardings,
                                          self.train_sharding)
        self.eval_step = make_eval_step(self.parts, self.param_shardings, self.eval_sharding)
        if self.model_config.moe is not None and mesh.shape["expert"] > 1:  # MoE blocks run expert-parallel
            self.train_step = within_mesh(self.train_step, mesh)
            self.eval_step = within_mesh(self.eval_step, mesh)

    @property
    def tokens_per_step(self) -> int:
        return self.train_config.batch_size * self.train_config.seq_len

    # ------------------------------------------------------------------------------ running

    def batch(self, step: int) -> jax.Array:
        """The global batch of training step `step` (0-based), [accum, micro_batch, T+1] on the mesh."""
        tc = self.train_config
        tokens_bt1 = data.batch_at(self.train_tokens, tc.seed, step, tc.batch_size, tc.seq_len)
        return put_global(tokens_bt1.reshape(tc.accum_steps, -1, tc.seq_len + 1), self.train_sharding)

    def train(self, on_metrics: Callable[[int, dict[str, float]], None]) -> None:
        """Trains from the current step to `steps`, checkpointing and validating on the way."""
        tc = self.train_config

        def validate(state):
            result = evaluate(self.eval_step, state["params"], self.val_windows, self.eval_batch_size,
                              self.byte_lengths_v, self.eval_sharding)
            return {"val_loss": result["loss"], "val_bits_per_byte": result["bits_per_byte"]}

        self.state = loop.train_loop(
            self.state, self.train_step, self.batch, start_step=self.start_step, num_steps=tc.steps,
            on_metrics=on_metrics, checkpointer=self.checkpointer, checkpoint_every=tc.checkpoint_every,
            eval_fn=validate, eval_every=tc.eval_every)

    def evaluate(self, split: str = "test", max_windows: int | None = None) -> dict[str, float]:
        """Mean NLL per token and bits per byte of the current parameters on a split's windows."""
        windows = data.eval_windows(self.tokens(split), self.train_config.seq_len, max_windows)
        result = evaluate(self.eval_step, self.state["params"], windows, self.eval_batch_size,
                          self.byte_lengths_v, self.eval_sharding)
        return {**result, "windows": int(windows.shape[0]), "tokens": int(windows[:, 1:].size)}

    def final_eval(self) -> dict[str, Any]:
        """Test-split evaluation, written to RUN/eval.json (process 0)."""
        result = self.evaluate("test", self.train_config.test_windows)
        record = {"split": "test", "step": int(self.state["step"]), **result}
        if jax.process_index() == 0:
            write_json_atomically(self.out_dir / "eval.json", record)
        return record

    def export(self, path: str | os.PathLike | None = None) -> Path:
        """Writes the model directory (config.json, model.safetensors, tokenizer) (process 0)."""
        path = Path(path) if path is not None else self.out_dir / "model"
        params = multihost_utils.process_allgather(self.state["params"], tiled=True)  # numpy on every host
        if jax.process_index() == 0:
            save_hf(self.parts.merge(jax.tree.map(jnp.asarray, params)), path, tokenizer=self.tokenizer)
        return path

    def close(self) -> None:
        self.checkpointer.close()

    def __enter__(self) -> Pretraining:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
