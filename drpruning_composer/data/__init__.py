"""Data: preparation of per-domain MDS shards, the embedded demo corpus and the dynamic mixture loader."""
