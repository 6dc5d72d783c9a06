"""Data: synthetic tiles and slides, the dataset layout and importers, patch extraction, augmentation and
training targets. Nothing here imports torch."""
