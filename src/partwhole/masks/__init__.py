"""Stage 1: three nested masks per point of a patch grid, from SAM / SAM 2.1 teachers or from sources without a model.
"""
