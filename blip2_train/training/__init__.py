"""Training: the LightningModules (thin: they call models/objectives.py), callbacks, tracking, FSDP
units, the optimizer, ``init_from`` and the fit function (docs/architecture.md)."""
