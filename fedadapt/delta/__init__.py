"""What a device sends: the adapter schema, deltas and their bounded wire serialization."""
