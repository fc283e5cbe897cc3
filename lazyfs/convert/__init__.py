"""convert: rewriting images as zstd:chunked with fs-verity digests (``lazyfs convert``).

Owns: ``converter`` (the order of work: layers, configs, manifests, and the tagged root last),
``localize`` (the one "localize a layer" pipeline, shared with mount for plain layers),
``stores`` (where images come from and go to: a registry repository or an OCI layout),
``layout`` (OCI image layouts on disk), ``imagebuild`` (the one OCI image builder, for the demo,
the benchmarks and the tests) and ``sample`` (the demo's image).

May import: ``formats``, ``registry``, ``model``, ``errors``, ``config``, ``localfiles``.
Never imports: ``cache``, ``mount``, ``cli``.
"""
