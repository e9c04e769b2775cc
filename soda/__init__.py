"""SODA: sensitivity-oriented dynamic acceleration for Diffusion Transformers.

Only `soda.models`, `soda.profile` and `soda.torch_backend` import torch; everything the
deploy runtime needs (sampling, schedules, policies, selectors, the stitching loop) is numpy;
the stitching loop and selectors compute on whatever arrays the backend returns (`soda.arrays`).
"""
__version__ = "0.1.0"
