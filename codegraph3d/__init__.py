"""CoDeGraph3D: training-free zero-shot anomaly detection in 3D brain MRI.

The library knows nothing of the MONAI Deploy SDK: every stage is a plain function or a small
class on numpy/torch arrays with explicit geometry. ``operators/`` adapts it to the SDK.
"""

__version__ = "0.1.0"
ALGORITHM_NAME = "CoDeGraph3D"
