"""Datasets the model trains and is tested on; for now only synthetic phantoms."""
