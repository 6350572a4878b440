"""The server's side of a round: checking replies, streaming FedAvg, server optimizers, server-side training."""
