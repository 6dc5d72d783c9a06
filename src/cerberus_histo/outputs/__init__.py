"""Result writers, one road for tiles and slides (no torch).

* :mod:`.records`: :class:`~.records.AnnotationRecords`, the one columnar set of objects per task, built from
  post-processed results (:func:`~.records.annotation_records`); the one place that decides what a model knows
  (the trusted heads, untyped instances) for every format.
* :mod:`.store`: the SQLite store in TIAToolbox's schema; it owns every SQL statement (records in and out, the
  whole-slide chunk ledger, counts, metadata).
* :mod:`.geojson` (QuPath GeoJSON, HoVer-Net JSON), :mod:`.summary` (one summary schema), :mod:`.overlay` (one
  renderer for overlays and thumbnails).
* :mod:`.writers`: every file of a tile (:func:`~.writers.write_outputs`) or a slide
  (:func:`~.writers.write_slide_outputs`, streamed from its store).
"""
