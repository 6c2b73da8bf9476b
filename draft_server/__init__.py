"""splitspec draft server: the draft model on pinned CPUs, streaming candidate blocks."""
