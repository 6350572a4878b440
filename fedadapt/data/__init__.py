"""Examples in: dataset readers, the label map, splits, synthetic per-user tasks, partitions, batching."""
