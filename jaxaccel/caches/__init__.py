"""Per-layer cache entries, one type per attention kind (see jaxaccel.layers.attention_kinds).

Every entry has the same commit API, called by `KVCache` with the row lengths *before* the
commit: `advance(lengths_b, count_b)` keeps the first count_b[b] tokens of the last forward pass,
`keep(lengths_b, offsets_bk, count_b)` keeps the new tokens at offsets_bk[b, :count_b[b]] in order.
"""
