"""The mini-study: the paper's experiments at CPU scale (tools/mini_study.py)."""
