"""The frozen backbone and what wraps it: loading, pooling, the frozen-weight guard, AdapterModel, device choice."""
