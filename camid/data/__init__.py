"""The data the models learn from: the crop-cache format, the training/eval datasets, the virtual camera zoo."""
