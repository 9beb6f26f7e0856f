"""The encoder: MedVAE architectures and weights, the encode/decode runtimes, the pooling heads.

:func:`retrieval.model.loader.load_encoder` is the one entry point; it returns the real MedVAE
encoder or, when explicitly asked for (``weights=fake``), the deterministic fake with the same contract.
"""
