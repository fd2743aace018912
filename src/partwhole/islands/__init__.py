"""Islands of agreement: scores against masks, figures, animations and the explorer page.
"""
