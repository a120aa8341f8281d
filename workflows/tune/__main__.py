"""`python -m workflows.tune ARGS` == `cnnflow tune ARGS` (for `ray job submit`)."""
from workflows.cli import main_for

if __name__ == "__main__":
    main_for("tune")
