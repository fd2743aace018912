"""The toy set: the generator of its images, ground truth and oracle stage-1 masks (the pipeline that runs the stages on it,
for the demo and the study, runs command lines: ``partwhole_cli.toy_pipeline``).
"""
