"""Integrations with serving frameworks; each module needs its own extra.

* :mod:`cacheroute.integrations.ray_serve`: a Ray Serve request router (the ``ray``
  extra), with its process-wide state in
  :mod:`cacheroute.integrations.ray_serve_state`.

Importing this package imports no optional dependency.
"""
