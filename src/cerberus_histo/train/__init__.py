"""Training: multi-task losses and batch composition (the Lightning engine builds on them)."""
