"""Training: the loop (``trainer``), optimizers and schedules, checkpoints, logs, runtime settings.

The package itself is callable: ``attnlab.train(config, **overrides)`` is ``attnlab.train.launch.train``
(a subpackage and a function cannot otherwise share the name ``attnlab.train``).
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        """attnlab.train(config=None, *, force=False, **overrides) -> summary.json's content (see ``launch.train``)."""
        from .launch import train
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
