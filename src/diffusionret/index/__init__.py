"""On-disk video index and cascade search.

- :mod:`.store`: :class:`~diffusionret.index.store.VideoIndex` (build / update / load / first-stage search)
- :mod:`.searcher`: :class:`~diffusionret.index.searcher.Searcher` (text -> pooled first stage -> WTI -> diffusion)
- :mod:`.first_stage`: exact (fp32 / fp16) and IVF (FAISS, optional) search over the pooled embeddings
- :mod:`.builder`: resumable, sharded, torchrun-aware build and update
- :mod:`.catalog`, :mod:`.shards`: the SQLite catalogue and the safetensors feature shards
- :mod:`.encode`: :class:`~diffusionret.index.encode.ModelVideoEncoder` (PyAV + the model)
- :mod:`.discover`: finding videos (folders, ``.txt``/``.csv`` lists)
- :mod:`.identity`: the model digest that ties an index to its model
- :mod:`.testing`: a model-free synthetic extractor and searcher, for tests and benchmarks

Nothing is imported here, so ``import diffusionret.index`` stays light.
"""
