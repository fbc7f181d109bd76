"""Vigil core: streaming feature windows, sparse/3D attention, quantization, tracking and broker plumbing.

``import core`` needs only torch and numpy; every heavier library is imported where it is used.
"""

__version__ = "0.1.0"
