"""Text for calibration, healing and evaluation: files, hub datasets, and text sampled from a model."""
