"""The HTTP server: an OpenAI-compatible API over one loaded model.

>>> from openbagel.serve import ServeSettings, create_app
>>> app = create_app(ServeSettings(model=None))  # the embedded model, loaded at startup
>>> # uvicorn.run(app, host="127.0.0.1", port=8000)

``openbagel serve`` does the same from the command line.
"""

from openbagel.serve.app import create_app
from openbagel.serve.settings import Limits, ServeSettings

__all__ = ["Limits", "ServeSettings", "create_app"]
