"""Synthetic studies: the phantom, the labelled dataset in the Kaggle layout, export of a model-ready set."""
