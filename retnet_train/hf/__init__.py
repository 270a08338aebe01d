"""Hugging Face export: the files that make an export folder load with transformers' Auto classes
(`python -m retnet_train.export CKPT OUT --hf`). See folder.py; the code the folder runs is
remote/*.py and a flat copy of retnet_train.model (bundle.py)."""
