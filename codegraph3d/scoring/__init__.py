"""Zero-shot token scores: the MuSc nearest-neighbour scorer (``musc``), CoDeGraph's removal of
anomalies repeated across volumes (``codegraph``), a contrast batch scored layer by layer
(``batch``) and token scores turned into voxel maps (``maps``).
"""
