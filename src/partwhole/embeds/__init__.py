"""Stage 2: every masked image embedded by a timm backbone (the teacher), per image and point and level.
"""
