"""`cnnflow tune DATA`: a hyperparameter search with Ray Tune, each trial a Ray Train run.

`driver.py` runs the search under a parent MLflow run and registers the best trial;
`space.py` holds what is searched, the ASHA scheduler and the trials' names; `trial.py`
is one trial (a Tune function trainable around `cnnflow train`'s `train_and_log`);
`callbacks.py` the trials table and the runs of stopped trials; `results.py` the end of
a search; `resume.py` which search `--resume` or `--name` goes on with. Nothing is
imported here: Ray's trial actors import this package to reach `trial.py`.
"""
