"""Flower ServerApp: aggregates adapter deltas with FedAvg, checkpoints every round, resumes."""
