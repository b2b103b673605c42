"""The HTTP server: an OpenAI-compatible API over one loaded model.

>>> from openbagel.serve import ServeSettings, create_app, uvicorn_options
>>> settings = ServeSettings(model=None)  # the embedded model
>>> app = create_app(settings)  # loads the model at startup
>>> # uvicorn.run(app, host="127.0.0.1", port=8000, **uvicorn_options(settings))

``openbagel serve`` runs :func:`run_server` (thread pools sized to the cores, then uvicorn).
"""

from openbagel.serve.app import create_app
from openbagel.serve.http import run_server, uvicorn_options
from openbagel.serve.settings import Limits, ServeSettings

__all__ = ["Limits", "ServeSettings", "create_app", "run_server", "uvicorn_options"]
