"""partwhole: distilling SAM's part-whole masks into a GLOM-style Agglomerator, as a library.

One package per stage, plus what every stage shares (docs/architecture.md):
``common`` (files, errors, devices, processes), ``masks`` (stage 1: teachers and maskers), ``embeds`` (stage 2),
``agglomerator`` (stage 3), ``islands`` (scores, figures, the explorer page) and ``toy`` (the toy set and its pipeline).
Nothing here reads flags: the command lines are ``partwhole_cli``.
"""
