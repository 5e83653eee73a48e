"""`deeplab serve`: the model behind an HTTP API and a web page.

`service` holds the model behind the dynamic batcher (`batcher`) and makes the answers; `app` is the ASGI app (its
routes, with `http` for access, errors and limits, and `v2` for the Open Inference Protocol); `images` decodes
uploads under the service's limits; `metrics` renders Prometheus' text format; `page/` is the web page. It sits
above `inference` and `deploy`: a served mask is computed by the functions `deeplab predict` uses.
"""

from .app import create_app
from .service import ServeSettings, Service

__all__ = ["ServeSettings", "Service", "create_app"]
