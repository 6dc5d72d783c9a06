"""Data: training targets (and, as they land, the synthetic generator, importers, patches and augmentation)."""
