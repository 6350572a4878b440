"""Flower ClientApp: trains adapters on a device's local data and sends encrypted adapter deltas."""
