"""Stage 3: the Agglomerator (GLOM-style columns of level embeddings), its data, objectives and training.
"""
