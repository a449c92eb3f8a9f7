"""The registered MLflow pyfunc: request parsing, per-row answers and the served signature (`model.py`);
`model_code.py` is the models-from-code file MLflow runs to build it."""
