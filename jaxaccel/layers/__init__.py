"""Building blocks of the decoder: norms, rotary embeddings, MLP, attention."""
