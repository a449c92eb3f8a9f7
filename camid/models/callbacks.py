"""The per-epoch validation score training and tuning both monitor: the competition's weighted accuracy over
the validation patches (unaltered and manipulated), written into the Keras epoch logs and logged to MLflow."""
from __future__ import annotations

import numpy as np

MONITOR = "val_weighted_accuracy"


def predict_cameras(model, images: np.ndarray, manipulated: np.ndarray, batch_size: int) -> np.ndarray:
    """Camera probabilities for uint8 patches (no TTA: the per-epoch check must be cheap)."""
    out = model.predict({"image": images.astype("float32"), "manipulated": manipulated.reshape(-1, 1).astype("float32")},
                        batch_size=batch_size, verbose=0)
    return np.asarray(out["camera"])


def scoring_callbacks(evalset, batch_size: int) -> list:
    """Per-epoch validation score (weighted accuracy over unaltered + manipulated patches) and MLflow logging.

    Listed before anything that monitors MONITOR: they read the value these write into the epoch logs.
    """
    import keras
    import mlflow

    from camid.core.metrics import weighted_accuracy

    class ValidationScore(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            probs = predict_cameras(self.model, evalset.images, evalset.manipulation > 0, batch_size)
            logs[MONITOR] = weighted_accuracy(evalset.labels, probs.argmax(1), evalset.manipulation > 0)
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    class MlflowEpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            mlflow.log_metrics({k: float(v) for k, v in (logs or {}).items()}, step=epoch)

    return [ValidationScore(), MlflowEpochLogger()]
