"""Deterministic fakes for writing tests and benchmarks against diffusionret; nothing in the real pipeline uses them.

- :mod:`.videos`: tiny synthetic videos written with PyAV (:func:`~diffusionret.testing.videos.write_video`),
  and frames that carry their own number (:func:`~diffusionret.testing.videos.index_frame` /
  :func:`~diffusionret.testing.videos.read_index`), to check which frames a decoder or sampler returned.
- :mod:`.index`: a model-free feature extractor and searcher
  (:class:`~diffusionret.testing.index.SyntheticExtractor`,
  :class:`~diffusionret.testing.index.SyntheticSearcher`) that build and query a real on-disk index
  in milliseconds, for tests of the index, the HTTP API and the web page, and for load tests.

Nothing is imported here, so ``import diffusionret.testing`` stays light.
"""
