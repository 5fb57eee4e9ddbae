"""Checkpoint names, files and formats. Works on state dicts and files; never imports the model."""
