"""Foundations every layer may use: geometry (``volume``), atomic files (``files``), stage timing and
memory (``progress``). Imports nothing else from the package.
"""
