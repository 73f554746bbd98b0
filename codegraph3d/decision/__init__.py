"""From scores to what a hospital sees: the lesion policy (``lesion_policy``), the volume-level
thresholds it builds on (``thresholds``) and the measured operating points (``operating_point``).
"""
