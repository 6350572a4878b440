"""Local training: the loop, the frozen-prefix cache, personalization and the centralized baseline."""
