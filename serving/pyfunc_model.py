"""The file MLflow logs as the model's code ("models from code", no pickle): loading the model
runs it, and it names the model (serving/pyfunc.py, loaded from the model's own copy of our
packages)."""

import mlflow

from serving.pyfunc import BundleModel

mlflow.models.set_model(BundleModel())
