"""Models-from-code entry for the registered pyfunc: MLflow runs this file to build the model object."""
import mlflow

from camid.serving.model import CamidModel

mlflow.models.set_model(CamidModel())
