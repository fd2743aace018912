"""Stages 1 and 2: SAM point-grid masks per image, then timm embeddings of every masked image."""
