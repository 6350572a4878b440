"""Sealing and masking deltas: the privacy config, envelopes, keys, transport and SecAgg+."""
