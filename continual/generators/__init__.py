"""Data generators: the controlled benchmark (synth) and TTL-shaped files (ttl_shaped); tools/ holds their commands."""
