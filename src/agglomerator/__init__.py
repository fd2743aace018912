"""Stage 3: the Agglomerator (GLOM-style columns of level embeddings), its training and analysis."""
