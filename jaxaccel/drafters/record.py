"""DrafterRecord: everything the house knows about one drafting method, in one place.

A record names the method, says how to build its drafter (`make`), and carries what the rest of
the house asks about it: its trained module (heads built by `make_heads`, trained by
`train.heads`), its default tree, its training rule, and its capabilities. Code outside a
record never branches on a method's name: it asks the record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jaxaccel.decoding.tree import DynamicTree, Tree
from jaxaccel.drafters.protocol import Drafter


@dataclass(frozen=True)
class DrafterRecord:
    """One drafting method. `make(tree, module, **options) -> Drafter` gets a checked tree (or
    None for a method without a default tree) and the trained module (or None)."""

    name: str
    summary: str  # one line, for `python -m infer.drafters`
    make: Callable[..., Drafter]
    module: type | None = None  # the trained heads' NNX module class (None: training-free)
    default_tree: Tree | None = None
    train_depth: Callable[[Any, Any], int] | None = None  # (HeadsConfig, DistillConfig) -> depths trained per step
    heads_options: tuple[str, ...] = ()  # boolean HeadsConfig options the module takes
    depth_per_head: bool = False  # one head per tree level: static trees at most num_heads deep
    dynamic_trees: bool = False  # also drafts a DynamicTree (grown per row, EAGLE-2)
    options: tuple[str, ...] = ()  # NAME:key=value options `make` accepts (for the listing)
    # model_dir -> options a search recorded beside the model (used unless given; {}: none recorded)
    recorded_options: Callable[[Any], dict] | None = None
    composes: bool = False  # training-free, and adds its branches to trained heads' tree (--heads DIR --drafter NAME)
    trainer: str | None = None  # the command that trains its heads (default: train.heads --kind NAME)

    @property
    def trained(self) -> bool:
        return self.module is not None

    def build(self, module=None, tree: Tree | DynamicTree | None = None, **options) -> Drafter:
        """The drafter for these heads (trained methods), tree (None: the default) and options."""
        if self.trained and module is None:
            raise ValueError(f"the {self.name} drafter needs trained heads (--heads DIR)")
        if not self.trained and module is not None:
            raise ValueError(f"the {self.name} drafter takes no trained heads (make_drafter composes them)")
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for drafter {self.name!r}; it takes {list(self.options)}")
        depth = module.config.num_heads if module is not None and self.depth_per_head else None
        if tree is None and self.default_tree is not None:  # the default, cut to the depth the heads draft
            tree = Tree(tuple(p for p in self.default_tree.paths if depth is None or len(p) <= depth))
        if isinstance(tree, DynamicTree) and not self.dynamic_trees:
            growers = [r.name for r in _registered() if r.dynamic_trees]
            raise ValueError(f"dynamic (EAGLE-2) trees need {' or '.join(growers)} heads, not {self.name}")
        if depth is not None and tree is not None and tree.depth > depth:
            raise ValueError(f"the tree is {tree.depth} levels deep, but these {self.name} heads draft only {depth}")
        return self.make(tree=tree, module=module, **options)

    def describe(self) -> dict[str, Any]:
        """The record as plain values (what `python -m infer.drafters --json` prints)."""
        tree = self.default_tree if self.default_tree is not None or self.trained else self.build().tree
        return {"name": self.name, "summary": self.summary, "trained": self.trained,
                "options": list(self.options), "dynamic_trees": self.dynamic_trees,
                "default_tree_nodes": None if tree is None else tree.num_nodes,
                "heads_options": list(self.heads_options), "composes_with_heads": self.composes,
                "trainer": (self.trainer or f"python -m train.heads --kind {self.name}") if self.trained else None}

    def replace(self, **changes) -> DrafterRecord:
        return dataclasses.replace(self, **changes)


def _registered():
    from jaxaccel.drafters.registry import RECORDS  # the registry imports this module

    return RECORDS.values()
