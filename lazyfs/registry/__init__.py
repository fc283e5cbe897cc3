"""registry: the network layer, and the only one that imports httpx (docs/architecture.md).

Owns: ``client`` (OCI distribution operations, and the retry policy, which lives here only),
``transport`` (httpx, TLS, plain-HTTP fallback, auth and redirects), ``bodies`` (reading and
slicing answers), ``auth`` (the token and basic auth flow), ``credentials`` (auth files and
credential helpers, without httpx: the CLI looks credentials up with it), ``wire`` (HTTP status
-> lazyfs errors), ``mirrors`` and ``failover`` (registries.conf-style mirrors, one failover
mechanism), ``sources`` (byte sources over the registry), and ``localserver`` (runs Debian's
docker-registry on loopback for the demo, the benchmarks and the tests).

May import: ``model``, ``errors``, ``config``, ``localfiles``. Never imports: ``cache``,
``formats``, ``convert``, ``mount``, ``cli``. Local disk I/O goes through ``localfiles``
or a sink its caller hands in.
"""
