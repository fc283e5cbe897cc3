"""cli: the ``lazyfs`` command line, the top layer (docs/architecture.md).

Owns: argument parsing and the commands (``main``: the parser and one-line errors; ``convert``,
``mount`` (mount, umount, stats), ``demo``, ``bench``), shared flags (``common``) and progress
on a terminal (``progress``). Flags follow skopeo and podman.

May import: anything in lazyfs; commands import heavy modules only when they run, so that
``lazyfs mount`` as a client stays cheap. Nothing imports ``cli`` but ``lazyfs/__main__.py``
and the ``lazyfs`` entry point.
"""
