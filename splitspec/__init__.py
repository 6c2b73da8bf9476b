"""Shared server-side core of splitspec: sampling, speculative math, KV cache, topology, gRPC bootstrap."""
