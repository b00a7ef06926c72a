"""The research harness around the gate library: experiment configs, datasets, reference
models and the training command (`python -m keras_stg.train`).

Nothing in the library (`keras_stg.wrap`, `strip`, `shrink`, ...) imports this package.
"""
