"""cnsq: run a machine-learning model over millions of map tiles on AWS."""

__version__ = "0.1.0"
