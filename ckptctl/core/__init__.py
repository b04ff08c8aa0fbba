"""Pure core of ckptctl: the on-disk format, the index (manifest) and retention rules.

Nothing in this package touches the filesystem, torch, or any CLI library.
"""
