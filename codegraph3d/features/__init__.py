"""Frozen 2D encoders (``encoders``) and the 3D tokens pooled from their slice features (``tokens``)."""
