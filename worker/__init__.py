"""embedq's worker side: settings, the inference engine, the model store and the Celery app.

``celery -A worker worker`` asks this package for ``celery``; the app is imported only then, so
importing ``worker.errors`` or ``worker.settings`` does not build it.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "celery":
        from worker.app import app

        return app
    raise AttributeError(name)
