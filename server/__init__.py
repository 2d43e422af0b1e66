"""telerad-bridge: one site's gateway of the DRG teleradiology network."""

__version__ = "0.1.0"
