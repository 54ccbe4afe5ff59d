"""Training: the loop (``trainer``), optimizers and schedules, checkpoints, logs, runtime settings, and
``python_api.train``, which is ``attnlab.train(config, **overrides)``."""
