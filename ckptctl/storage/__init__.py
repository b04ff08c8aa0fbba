"""Storage IO: atomic writes, the run lock, scanning runs, and the Drive mirror.

Imports no torch and no CLI or rendering library; progress is reported through callbacks.
"""
