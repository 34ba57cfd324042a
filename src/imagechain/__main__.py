"""`python -m imagechain`: the console script (the agent starts job runs this way)."""

from .entry import run

run()
