"""splitspec client SDK: talk to a splitspec target server over gRPC. Needs no torch."""
