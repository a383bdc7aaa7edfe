"""Datasets: the registry, normalisation and ZCA whitening."""

from dpd_cli.data.datasets import Dataset, load_dataset
from dpd_cli.data.preprocess import Preprocess, fit_zca

__all__ = ["Dataset", "load_dataset", "Preprocess", "fit_zca"]
