"""The local library of model files and what each file is."""
