"""Drafters: every drafting method behind one protocol (jaxaccel.drafters.protocol), one record
each (jaxaccel.drafters.registry, whose doc says how to add one)."""

from jaxaccel.drafters.protocol import Draft, Drafter, Prefill, Verified
from jaxaccel.drafters.record import DrafterRecord
from jaxaccel.drafters.registry import RECORDS, get_record, heads_kinds, make_drafter, parse_spec, register

__all__ = ["RECORDS", "Draft", "Drafter", "DrafterRecord", "Prefill", "Verified", "get_record", "heads_kinds",
           "make_drafter", "parse_spec", "register"]
