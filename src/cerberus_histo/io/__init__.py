"""Input and output: safe file helpers (and, as they land, slide readers and result writers). No torch."""
