"""Serving: the run folder and its reader, predictors over every format, and export."""
