"""The persistence API's parts; :mod:`ckptctl.persistence` is the facade a training loop imports.

- ``background``   the one background worker: first error wins, dependent jobs skipped
- ``index_state``  the run's index, held thread-safely; every commit goes through it
- ``open``         opening a run: cleanup, takeover, index rebuild/adoption, best repair
- ``saving``       save scheduling, staging policy, write + retention + disk-full recovery
- ``best``         best-model tracking and its two write paths
- ``mirroring``    the Drive mirror's bookkeeping in the local run
- ``loading``      checked loads behind resume / load_checkpoint / load_best_model
- ``runs``         module-level helpers: Drive setup, newest checkpoint, restore from Drive
- ``adopt``        the index of a run restored from loose files, built as opening it would
"""
