"""The pipeline stages, one module per `dvc.yaml` stage (acquire -> filter -> split -> prepare -> train/tune ->
evaluate -> register) plus batch `predict`. Stages use the building blocks; no stage imports another."""
