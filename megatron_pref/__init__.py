"""megatron-pref: preference optimisation (DPO family, SPO, SLIME) on megatron-core."""

__version__ = "0.1.0"
