"""The toy set (generator of images, ground truth and oracle masks) and the pipeline the demo and the study share.
"""
