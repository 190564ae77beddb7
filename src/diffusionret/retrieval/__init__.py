"""Retrieval: the one query path (:func:`retrieve`) and diffusion re-ranking (:class:`Reranker`).

Depends on :mod:`diffusionret.models` and :mod:`diffusionret.diffusion`; the models never import it.
"""

from diffusionret.retrieval.cascade import CandidateRecord, CandidateStore, FeatureStore, Hit, encode_queries, retrieve
from diffusionret.retrieval.reranker import RerankConfig, Reranker

__all__ = ["CandidateRecord", "CandidateStore", "FeatureStore", "Hit", "RerankConfig", "Reranker", "encode_queries",
           "retrieve"]
