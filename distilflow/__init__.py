"""distilflow: Prefect batch jobs from a raw English corpus to a distilled BERT and its batch use."""

__version__ = "0.1.0"
