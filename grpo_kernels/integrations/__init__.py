"""Bridges to the trainers our users run (TRL). Nothing here imports the other project at import time."""
