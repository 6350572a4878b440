"""The fleet stage: scenarios, simulated faults, a device's data and its local round, and the apps' run config.

Light modules (``scenario``, ``faults``, ``run_config``, ``data``, ``device_data``) load no torch, so the
ClientApp's key-exchange stages and ``fedadapt --help`` stay fast; ``build`` and ``device_round`` do.
"""
