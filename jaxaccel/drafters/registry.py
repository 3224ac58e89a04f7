"""The drafter registry: one record per drafting method, and `make_drafter`.

    make_drafter("pld")                          prompt lookup, default options
    make_drafter("pld:depth=6,branches=2")       NAME:key=value,... (the CLIs' --drafter)
    make_drafter(heads=heads, tree=tree)         trained heads: their kind's record
    make_drafter("pld", heads=heads)             both in one tree (a record with `composes`)
    make_drafter("rest+pld:depth=2")             training-free drafters in one tree (each `composes`)
    SpeculativeDecoder(model, drafter)

Adding a drafter is one new file plus one record:
  1. jaxaccel/drafters/NAME.py: a frozen dataclass with `tree`, `module` (None unless trained) and
     the three methods of jaxaccel.drafters.protocol (start, draft, commit), its state any pytree
     of static shapes; at the bottom, `RECORD = DrafterRecord(name=..., summary=..., make=...)`
     (and, for trained heads, the NNX `module` class, `train_depth`, `heads_options`).
  2. Its record in RECORDS below (or `register(RECORD)` from outside, as tests/test_drafters.py does).
The loop, the CLIs (--drafter NAME:options), `python -m infer.drafters`, `make_heads` and
`train.heads` then know it; nothing else branches on its name.
"""

from __future__ import annotations

import re

from jaxaccel.drafters import eagle, eagle3, hydra, layerskip, lookahead, medusa, pld, recycling, rest, share
from jaxaccel.drafters.protocol import Drafter
from jaxaccel.drafters.record import DrafterRecord

RECORDS: dict[str, DrafterRecord] = {r.name: r for r in (medusa.RECORD, hydra.RECORD, eagle.RECORD, eagle3.RECORD,
                                                         pld.RECORD, rest.RECORD, share.RECORD, recycling.RECORD,
                                                         layerskip.RECORD, lookahead.RECORD)}


def register(record: DrafterRecord) -> DrafterRecord:
    """Adds (or replaces) a record."""
    RECORDS[record.name] = record
    return record


def get_record(name: str) -> DrafterRecord:
    """The record of a drafting method (ValueError naming the known ones)."""
    if name not in RECORDS:
        raise ValueError(f"unknown drafter {name!r}; known: {', '.join(RECORDS)}")
    return RECORDS[name]


def heads_kinds() -> tuple[str, ...]:
    """The methods with trained heads (HeadsConfig.kind values)."""
    return tuple(name for name, r in RECORDS.items() if r.trained)


def parse_spec(spec: str) -> tuple[str, dict[str, int | float | str]]:
    """'NAME' or 'NAME:key=value,...' -> (name, options); numbers become int or float."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--drafter {spec}: expected NAME or NAME:key=value,... (got {item!r})")
        options[key.strip()] = _number(value.strip())
    return name.strip(), options


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def split_spec(spec: str) -> list[str]:
    """'rest+pld:depth=2' -> ['rest', 'pld:depth=2']: a '+' joins drafters only where a known
    drafter's name follows it ('layerskip:skip=1+2' is one drafter)."""
    pieces = spec.split("+")
    parts = [pieces[0]]
    for piece in pieces[1:]:
        name = re.match(r"[A-Za-z_]\w*(?=:|$)", piece)
        if name and name.group() in RECORDS:
            parts.append(piece)
        else:
            parts[-1] += "+" + piece
    return parts


def composes(spec: str) -> bool:
    """Whether `spec` ('NAME[:options]', or several joined by '+') adds its branches to heads' trees."""
    return all(get_record(parse_spec(part)[0]).composes for part in split_spec(spec))


def make_drafter(spec: str | None = None, *, heads=None, tree=None, model_dir=None) -> Drafter:
    """The drafter of `spec` ('NAME[:options]'), of trained `heads` (their kind's record), or both:
    the heads' own kind, or a training-free drafter that composes with them (one tree, the heads'
    `tree` plus its branches; jaxaccel.drafters.compose). `spec` may join training-free drafters
    that compose with '+' ('rest+pld:depth=2'): one tree of all. `tree` overrides the heads' (or
    the record's) default tree; `model_dir`: where options a search recorded for this model live."""
    if spec is None and heads is None:
        raise ValueError("make_drafter needs a drafter name or trained heads")
    if spec is not None and len(split_spec(spec)) > 1:
        from jaxaccel.drafters.compose import Composite

        parts = split_spec(spec)
        if tree is not None and heads is None:
            raise ValueError(f"--drafter {spec} lays out its own tree (each part's options), not --tree")
        if not composes(spec):
            raise ValueError(f"--drafter {spec}: only drafters that compose join with '+' (these do: "
                             f"{', '.join(r.name for r in RECORDS.values() if r.composes)})")
        joined = make_drafter(parts[0], model_dir=model_dir)
        for part in parts[1:]:
            joined = Composite.of(joined, make_drafter(part, model_dir=model_dir))
        return joined if heads is None else Composite.of(make_drafter(heads=heads, tree=tree), joined)
    name, options = parse_spec(spec) if spec is not None else (heads.config.kind, {})
    record = get_record(name)
    if record.recorded_options is not None:
        options = {**record.recorded_options(model_dir), **options}
    if heads is not None and not record.trained:
        if not record.composes:
            composing = [r.name for r in RECORDS.values() if r.composes]
            raise ValueError(f"--drafter {name} does not compose with --heads (these do: {', '.join(composing)})")
        from jaxaccel.drafters.compose import Composite

        return Composite.of(make_drafter(heads=heads, tree=tree), record.build(**options))
    if heads is not None and heads.config.kind != name:
        raise ValueError(f"--drafter {name} with {heads.config.kind} heads: the heads' kind decides their drafter")
    return record.build(module=heads, tree=tree, **options)
