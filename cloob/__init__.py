"""CLOOB/CLIP training library."""
