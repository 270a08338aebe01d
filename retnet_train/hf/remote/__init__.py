"""The code a Hugging Face folder runs, copied into it by folder.py. Not imported from here: the
modeling file imports its neighbours in that folder (the flat copy of retnet_train.model)."""
