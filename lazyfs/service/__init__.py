"""service: ``lazyfs serve``, the one long-running process that serves every image.

Owns: the control socket and its protocol (``protocol``, ``server``; ``client`` is what the CLI
uses), the service itself (``service``: one pyfuse3 session at the store root, the shared
registry clients, cache and singleflight table, the open images and their bind mounts),
``bindmounts`` (mount(2) and umount2(2)), ``state`` (the mounts a restarted service restores),
``metrics`` (the Prometheus endpoint) and ``paths`` (where a service lives, for a cache).

May import: ``mount``, ``cache``, ``registry``, ``convert``, ``formats``, ``model``, ``errors``,
``config``, ``localfiles``. Never imports: ``cli``, ``bench``. ``client``, ``protocol`` and
``paths`` import only the standard library and leaves (``paths`` also ``cache.layout``, for
the service record), none of them dataclasses, so that ``lazyfs mount`` as a client stays
cheap. Docs: docs/service.md; the event loop's rules: docs/concurrency.md.
"""
