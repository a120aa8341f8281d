"""`python -m workflows.train ARGS` == `cnnflow train ARGS` (for `ray job submit`)."""
from workflows.cli import main_for

if __name__ == "__main__":
    main_for("train")
