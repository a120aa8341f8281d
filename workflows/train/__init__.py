"""`cnnflow train DATA`: data-parallel training on Ray Train, tracked in MLflow, registered.

`plan.py` checks DATA, the model and the cluster before any worker starts; `driver.py`
creates the MLflow run, fits, and registers; `loop.py` is what each Ray Train worker
runs; `evaluation.py` scores the best epoch's weights on the validation split;
`artifacts.py` logs the run's figures and files; `progress.py` prints the epoch lines.
Nothing is imported here: Ray's workers import this package to reach `loop.py`.
"""
