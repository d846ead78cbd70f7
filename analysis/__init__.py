"""Loading sweep results (run folders or W&B) into DataFrames, and the figures of the notebooks."""
