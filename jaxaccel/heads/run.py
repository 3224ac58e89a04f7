"""A head-distillation run: one heads directory, resumable.

    HEADS_DIR/checkpoints/          orbax train states (head params, optimizer state, step)
    HEADS_DIR/data/                 cached token streams; generated.npy (the base's own continuations)
    HEADS_DIR/metrics.jsonl, tb/    written by the caller's MetricsLogger
    HEADS_DIR/heads.safetensors, heads_config.json    the heads (jaxaccel.heads.io)
    HEADS_DIR/eval.json             agreement with the base's greedy continuation (jaxaccel.heads.evaluate)

Batches are a pure function of (seed, step) and the base is frozen, so a run resumed from a
checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxaccel import data
from jaxaccel.files import write_json_atomically
from jaxaccel.checkpoint import TrainCheckpointer, restore_or_init
from jaxaccel.decoding import AutoregressiveDecoder, make_policy, pad_batch
from jaxaccel.heads import evaluate as agreement_eval
from jaxaccel.heads.config import HeadsConfig
from jaxaccel.heads.io import base_fingerprint, save_heads
from jaxaccel.heads.registry import HeadParts
from jaxaccel.hf import ModelDirectoryError, load_hf
from jaxaccel.sharding import make_mesh
from jaxaccel.training import loop, optim
from jaxaccel.training.distill import DistillConfig, init_state_fn, make_distill_step, train_depth
from jaxaccel.training.steps import ModelParts, put_global, tokens_sharding, train_state_shardings

GENERATION_STEP = 2**40  # the batch_at "step" that picks the generation prompts: never a training step


def check_setup(heads_config: HeadsConfig, config: DistillConfig, context: int) -> None:
    """Errors that name the problem: sequences longer than the context, more heads than fit, a
    trimmed draft vocabulary (those heads train on cached features)."""
    if heads_config.draft_vocab_size:
        raise ValueError("heads over a trimmed draft vocabulary (draft_vocab_size) train on cached base features: "
                         "python -m train.hydra (hydra, hydra++) or python -m train.eagle3, not train.heads")
    if config.seq_len > context:
        raise ValueError(f"seq_len ({config.seq_len}) exceeds the base model's context ({context} positions)")
    depth = max(heads_config.num_heads, train_depth(heads_config, config))
    if depth + 2 > config.seq_len:
        raise ValueError(f"{depth} draft heads need sequences of at least {depth + 2} tokens (head k drafts "
                         f"the token k + 2 places ahead), but seq_len is {config.seq_len} "
                         f"(the base model's context is {context} positions)")
    if config.generated_rows and config.seq_len + 1 > context:
        raise ValueError(f"generated_rows needs seq_len + 1 ({config.seq_len + 1}) tokens per row, more than the "
                         f"base model's context ({context} positions)")


class Distillation:
    """Distils `heads_config` heads from the model in `base_dir` into `out_dir`: built (and resumed
    from its latest checkpoint) on creation.

    Raises ModelDirectoryError / FileNotFoundError for a base directory that is not a model,
    ValueError for bad settings, and jaxaccel.checkpoint.IncompatibleCheckpointError when out_dir
    holds checkpoints of another configuration or base; in all these cases out_dir is not written.
    """

    def __init__(self, base_dir: str | os.PathLike, heads_config: HeadsConfig, config: DistillConfig,
                 out_dir: str | os.PathLike, *, mesh: Mesh | None = None,
                 eval_config: agreement_eval.AgreementConfig | None = agreement_eval.AgreementConfig(),
                 extra_dirs: Sequence[str | os.PathLike] = (), include_stdlib: bool = True):
        self.base_dir, self.out_dir = Path(base_dir), Path(out_dir)
        self.heads_config, self.config, self.eval_config = heads_config, config, eval_config
        self.mesh = mesh if mesh is not None else make_mesh()
        self.extra_dirs, self.include_stdlib = [Path(d).absolute() for d in extra_dirs], include_stdlib
        if not self.base_dir.is_dir():
            raise ModelDirectoryError(f"base model directory does not exist: {self.base_dir}")
        base = load_hf(self.base_dir)
        if not (self.base_dir / "tokenizer.json").is_file():
            raise ModelDirectoryError(f"{self.base_dir} has no tokenizer.json")
        self.tokenizer = data.load_tokenizer(self.base_dir)
        check_setup(heads_config, config, base.config.max_position_embeddings)
        if eval_config is not None:
            eval_config.check(heads_config.num_heads, base.config.max_position_embeddings)
        self.batch_devices = self.mesh.size // self.mesh.shape.get("tensor", 1)
        if config.batch_size % self.batch_devices:
            raise ValueError(f"batch_size ({config.batch_size}) must be a multiple of the {self.batch_devices} "
                             f"devices that split the batch on mesh {dict(self.mesh.shape)}")
        for split in data.SPLITS:  # a missing or empty corpus fails here, before anything is written
            data.list_documents(split, self.extra_dirs, include_stdlib)

        self.fingerprint = base_fingerprint(self.base_dir)
        self.base_parts = ModelParts.transformer(base.config)
        self.base_params = jax.device_put(self.base_parts.params(base), self.base_parts.shardings(self.mesh))
        self.base = base
        self.head_parts = HeadParts(heads_config, base.config)
        metadata = {"heads": heads_config.to_dict(), "train": config.to_dict(), "base": self.fingerprint,
                    "data": {"extra_dirs": [str(d) for d in self.extra_dirs], "include_stdlib": include_stdlib}}
        self.checkpointer = TrainCheckpointer(
            self.out_dir / "checkpoints", metadata=metadata, ignore_keys=[f"train.{k}" for k in config.RESUMABLE],
            max_to_keep=config.keep_checkpoints, save_interval_steps=config.checkpoint_every or config.steps)
        try:
            self._build()
        except BaseException:
            self.checkpointer.close()
            raise

    # ------------------------------------------------------------------------------ setup

    def tokens(self, split: str) -> np.ndarray:
        """The split's flat token stream under the base's tokenizer (cached unless capped)."""
        cap = self.config.corpus_max_bytes
        if cap is None:
            return data.token_stream(self.tokenizer, split, self.out_dir / "data", self.extra_dirs,
                                     self.include_stdlib)
        texts = data.load_texts(split, self.extra_dirs, self.include_stdlib)
        return data.tokenize_documents(self.tokenizer, data.files_within_bytes(texts, cap))

    def _build(self) -> None:
        c, mesh = self.config, self.mesh
        self.train_tokens = self.tokens("train")
        self.generated = self._generated_pool() if c.generated_rows else None
        self.schedule = optim.lr_schedule(c.lr, c.steps, c.warmup_steps, c.min_lr_ratio)
        optimizer = optim.make_optimizer(self.schedule, weight_decay=c.weight_decay, clip_norm=c.clip_norm)
        base_shardings = self.base_parts.shardings(mesh)
        abstract = jax.eval_shape(init_state_fn(self.base_parts, self.head_parts, optimizer, c.seed), self.base_params)
        self.state_shardings = train_state_shardings(abstract, self.head_parts.shardings(mesh), mesh)
        init = init_state_fn(self.base_parts, self.head_parts, optimizer, c.seed, self.state_shardings)
        self.state, self.start_step = restore_or_init(self.checkpointer, lambda: init(self.base_params))
        if self.start_step > c.steps:
            raise ValueError(f"{self.checkpointer.directory} holds step {self.start_step}, past steps {c.steps}")
        self.tokens_sharding = tokens_sharding(mesh, 2)
        self.train_step = make_distill_step(self.base_parts, self.head_parts, optimizer, self.schedule, c,
                                            self.state_shardings, base_shardings, self.tokens_sharding)

    def _generated_pool(self) -> np.ndarray:
        """[rows, seq_len + 1]: train-split prompts of half a row, continued by the base (cached)."""
        c = self.config
        path, meta_path = self.out_dir / "data" / "generated.npy", self.out_dir / "data" / "generated.json"
        meta = {"base": self.fingerprint, "seed": c.seed, "rows": c.generated_rows, "seq_len": c.seq_len,
                "temperature": c.generate_temperature, "corpus_max_bytes": c.corpus_max_bytes}
        if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
            return np.load(path)
        prompt_len = (c.seq_len + 1) // 2
        prompts = data.batch_at(self.train_tokens, c.seed, GENERATION_STEP, c.generated_rows, prompt_len - 1)
        decoder = AutoregressiveDecoder(self.base, self.mesh)
        policy, rows = make_policy(c.generate_temperature), []
        for i, start in enumerate(range(0, c.generated_rows, c.batch_size)):
            chunk = prompts[start:start + c.batch_size].tolist()
            result = decoder.generate(pad_batch(chunk, c.batch_size), policy=policy, seed=c.seed + i,
                                      max_new_tokens=c.seq_len + 1 - prompt_len)
            rows.append(np.asarray(result.tokens_bn)[:len(chunk)])
        pool = np.concatenate([prompts, np.concatenate(rows)], axis=1).astype(np.int32)
        if jax.process_index() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, pool)
            meta_path.write_text(json.dumps(meta))
        return pool

    # ------------------------------------------------------------------------------ running

    @property
    def tokens_per_step(self) -> int:
        return self.config.batch_size * self.config.seq_len

    def batch_np(self, step: int) -> np.ndarray:
        """Training step `step`'s rows [B, T+1]: text windows, then rows of the generated pool."""
        c = self.config
        n_gen = 0 if self.generated is None else round(c.batch_size * c.generated_fraction)
        rows = data.batch_at(self.train_tokens, c.seed, step, c.batch_size - n_gen, c.seq_len)
        if n_gen:
            picks = np.random.default_rng([c.seed, step, 1]).integers(0, len(self.generated), n_gen)
            rows = np.concatenate([rows, self.generated[picks]])
        return rows

    def batch(self, step: int) -> jax.Array:
        return put_global(self.batch_np(step), self.tokens_sharding)

    def train(self, on_metrics: Callable[[int, dict[str, float]], None]) -> None:
        """Trains from the current step to `steps`, checkpointing on the way."""
        c = self.config
        step_fn = lambda state, tokens: self.train_step(state, self.base_params, tokens)  # noqa: E731
        self.state = loop.train_loop(self.state, step_fn, self.batch, start_step=self.start_step, num_steps=c.steps,
                                     on_metrics=on_metrics, checkpointer=self.checkpointer,
                                     checkpoint_every=c.checkpoint_every)

    def heads(self):
        """The current heads as a module (parameters gathered to every host)."""
        params = multihost_utils.process_allgather(self.state["params"], tiled=True)
        return self.head_parts.merge(jax.tree.map(jnp.asarray, params))

    def export(self) -> Path:
        """Writes heads.safetensors and heads_config.json into the run directory (process 0)."""
        heads = self.heads()
        if jax.process_index() == 0:
            save_heads(heads, self.out_dir, self.base_dir, self.fingerprint)
        return self.out_dir

    def evaluate(self, split: str = "test") -> dict[str, Any]:
        """Agreement with the base's greedy continuation (jaxaccel.heads.evaluate) under eval_config,
        written to HEADS_DIR/eval.json (process 0)."""
        ec = self.eval_config or agreement_eval.AgreementConfig()
        ec.check(self.heads_config.num_heads, self.base.config.max_position_embeddings)
        batch_size = -(-ec.batch_size // self.batch_devices) * self.batch_devices
        windows = data.eval_windows(self.tokens(split), ec.prompt_len - 1, ec.prompts)
        paths = agreement_eval.greedy_paths(self.base, windows, ec.new_tokens, batch_size, self.mesh)
        result = agreement_eval.agreement(
            self.base_parts, self.head_parts, self.state["params"], self.base_params, paths,
            prompt_len=ec.prompt_len, depth=self.heads_config.num_heads, top_k=ec.top_k, batch_size=batch_size,
            mesh=self.mesh)
        record = {"split": split, "kind": self.heads_config.kind, "step": int(self.state["step"]),
                  "prompts": int(len(windows)), "prompt_len": ec.prompt_len, "new_tokens": ec.new_tokens,
                  "top_k": ec.top_k, **result}
        if jax.process_index() == 0:
            write_json_atomically(self.out_dir / "eval.json", record)
        return record

    def close(self) -> None:
        self.checkpointer.close()

    def __enter__(self) -> Distillation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
