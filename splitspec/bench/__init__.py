"""`make bench`: splitspec against target-only decoding, Hugging Face assisted generation and the ideal speedup
(`python -m splitspec.bench --help`)."""
