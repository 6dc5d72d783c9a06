"""Input and output below the results: safe files (atomic writes, strict JSON, the one image encoder, completion
markers), image and slide readers, tissue masks and the slide-wide grid reader. No torch; the result writers are
:mod:`cerberus_histo.outputs`."""
