"""From a loaded series to the encoder's grid and back: skull stripping (``skullstrip``), template
registration (``registration``), Nyul standardisation (``intensity``), the chain with its QA and the
inverse to source space (``chain``), and the worker pool that runs it per study (``workers``).
"""
