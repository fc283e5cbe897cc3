"""bench: the one benchmark tree (docs/benchmarks.md).

``lazyfs bench``: container cold start, full pull vs lazy mounts, over emulated links; and
``micro/``, the micro-benchmarks (``python -m lazyfs.bench.micro``). May import every folder
but ``cli``; nothing but ``cli`` imports it.

- :mod:`lazyfs.bench.links`: network namespace, veth pair, tbf shaper, delay proxy, validation
- :mod:`lazyfs.bench.proxy`: the delay proxy process (holds segments RTT/2 each way, counts)
- :mod:`lazyfs.bench.workload`: overlay + chroot runner with ready detection
- :mod:`lazyfs.bench.modes`: full-pull, lazy-cold, lazy-prefetch, lazy-warm, lazy-remount
- :mod:`lazyfs.bench.mountservice`: the ``lazyfs serve`` each lazy mode starts, "service up",
  mounts through it, no mount left behind
- :mod:`lazyfs.bench.podmanmodes`: podman-pull, podman-lazyfs, podman-peer (the runtime modes)
- :mod:`lazyfs.bench.peerstore`: the peer's layer store (stargz-store) and its eStargz image
- :mod:`lazyfs.bench.sharing`: N images in one service, read at once
  (``python -m lazyfs.bench.sharing``)
- :mod:`lazyfs.bench.images`: the python, gcc and busybox images (mmdebstrap, cached)
- :mod:`lazyfs.bench.report`: table, JSON, PNG chart
- :mod:`lazyfs.bench.runner`: orchestration

This module holds only names, so that ``lazyfs`` commands other than ``bench`` do not pay for
importing the rest.
"""

FULL_PULL = "full-pull"
LAZY_COLD = "lazy-cold"
LAZY_PREFETCH = "lazy-prefetch"
LAZY_WARM = "lazy-warm"
# A node's case: the running service mounted the image before (and released it since).
LAZY_REMOUNT = "lazy-remount"
MODES = (FULL_PULL, LAZY_COLD, LAZY_PREFETCH, LAZY_WARM, LAZY_REMOUNT)
# The runtime modes (issue 10): podman pulls and runs the image, in full, through lazyfs's
# layer store, or through the peer's (``--peer-store PATH``). Only when asked for.
PODMAN_PULL = "podman-pull"
PODMAN_LAZYFS = "podman-lazyfs"
PODMAN_PEER = "podman-peer"
RUNTIME_MODES = (PODMAN_PULL, PODMAN_LAZYFS, PODMAN_PEER)
ALL_MODES = MODES + RUNTIME_MODES
PROFILE_NAMES = ("loopback", "lan", "wan", "edge")
IMAGE_NAMES = ("python", "gcc", "busybox")
DEFAULT_IMAGES = ("python", "gcc")
