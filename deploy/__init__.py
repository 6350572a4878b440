"""A real deployment: ``fedadapt serve`` (SuperLink, TLS, the Fleet gateway, signed apps), ``fedadapt node``
(a device's SuperNode and its keys) and ``fedadapt certs``."""
