"""Client-level differential privacy: the ``[privacy.dp]`` config, clipping, Gaussian noise, adaptive clipping and
the (ε, δ) accountant. Each module imports only what it needs; ``dp_accounting`` loads inside the accountant's
functions, so importing this package stays light. Definitions and limits: docs/privacy.md.
"""
