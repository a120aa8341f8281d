"""The jobs: config, CLI, the prep/train/predict/promote/demo drivers, MLflow tracking.

The only package that imports `ray.train` and `mlflow`.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cnnflow")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
