"""What is kept on disk: adapter folders (manifest, plan, weights, limits), round checkpoints and their key."""
