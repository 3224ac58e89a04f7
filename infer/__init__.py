"""Programs: python -m infer.generate | infer.bench (thin wrappers over jaxaccel.decoding)."""
