"""On-disk video index and cascade search.

- :mod:`.store`: :class:`~diffusionret.index.store.VideoIndex` (load, first-stage search)
- :mod:`.searcher`: :class:`~diffusionret.index.searcher.Searcher` (text -> pooled first stage -> WTI -> diffusion)
- :mod:`.first_stage`: exact (fp32 / fp16), PQ and IVF (FAISS, optional) search over the pooled embeddings
- :mod:`.builder`: resumable, sharded, torchrun-aware build and update (``build_index``, ``update_index``)
- :mod:`.ann_build`: writing the PQ / IVF files (the read side never writes)
- :mod:`.catalog`, :mod:`.shards`: the SQLite catalogue and the safetensors feature shards
- :mod:`.encode`: :class:`~diffusionret.index.encode.ModelVideoEncoder` (PyAV + the model)
- :mod:`.discover`: finding videos (folders, ``.txt``/``.csv`` lists)
- :mod:`.identity`: the model digest that ties an index to its model

Read side: ``store``, ``searcher``, ``first_stage``, ``catalog``, ``shards``, ``features``; write side:
``builder``, ``ann_build``, ``encode``, ``discover``. The read side never imports the write side.
Model-free fakes for tests live in :mod:`diffusionret.testing.index`.

Nothing is imported here, so ``import diffusionret.index`` stays light.
"""
