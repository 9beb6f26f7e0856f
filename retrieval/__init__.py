"""medvae-retrieval: similar-case search for radiology archives on MedVAE latents."""

import os

# Two OpenMP runtimes share this process: PyTorch's libgomp and the one bundled with FAISS. Under the
# default policy each keeps its threads spinning on the cores after a parallel region, and the other
# runtime's work waits for them: MedVAE's 2 ms stage-2 head took 64 ms right after a FAISS search
# (bench/rerank.py, docs/benchmarks.md). Sleeping threads cost nothing measurable in encoding (4 images
# at 384 px: 7.4 s either way on two cores). Set before either library loads; a value already in the
# environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
