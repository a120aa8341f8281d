"""`cnnflow predict INPUT OUTPUT` (docs/architecture.md): one row per input file, by one model version.

    resolve the model once -> list INPUT (inputs.py) -> drop what OUTPUT already holds
    (output.py, resume) -> Ray Data pipeline (pipeline.py, scorer.py) -> part files +
    summary.json -> closing screen (console.py)

`driver.py` runs it. Nothing is imported here: Ray's decode tasks and model actors
import this package to reach `pipeline.py` and `scorer.py`.
"""
