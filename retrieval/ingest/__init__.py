"""The write path: list a source, skip what is stored, decode, encode, store, index.

Sources (folders, manifests, DICOMweb), the torch-free decode stage run in worker processes,
the 2-D and 3-D pipelines and the job worker.
"""
