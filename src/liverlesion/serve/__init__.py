"""``liverlesion serve``: a local browser viewer (and a small JSON API) for classifying lesions.

Modules: :mod:`.server` (HTTP routes, limits, ``make_server`` / ``serve``), :mod:`.studies` (studies kept
loaded between clicks), :mod:`.jobs` (model jobs and their progress), :mod:`.viewer` (what the page
asks of a study: slices, clicks, downloads), :mod:`.oneshot` (the one-shot form and ``/api/predict``),
:mod:`.multipart` (streamed uploads); the page itself is ``static/viewer.{html,js,css}``.
"""

from liverlesion.serve.multipart import FormField, parse_multipart, stream_multipart
from liverlesion.serve.server import DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_UPLOAD_BYTES, make_server, serve

__all__ = [
    "DEFAULT_MAX_CONCURRENT",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "FormField",
    "make_server",
    "parse_multipart",
    "serve",
    "stream_multipart",
]
