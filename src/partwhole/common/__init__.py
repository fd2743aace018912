"""What every stage shares: errors, safe files, image folders, the point grid, the mask and embedding file formats,
devices and precision, loader processes, and the per-image driver of stages 1 and 2.
"""
