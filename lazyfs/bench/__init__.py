"""bench: the one benchmark tree (docs/benchmarks.md).

``lazyfs bench``: container cold start, full pull vs lazy mounts, over emulated links; and
``micro/``, the micro-benchmarks (``python -m lazyfs.bench.micro``). May import every folder
but ``cli``; nothing but ``cli`` imports it.

- :mod:`lazyfs.bench.links`: network namespace, veth pair, tbf shaper, delay proxy, validation
- :mod:`lazyfs.bench.proxy`: the delay proxy process (holds segments RTT/2 each way, counts)
- :mod:`lazyfs.bench.workload`: overlay + chroot runner with ready detection
- :mod:`lazyfs.bench.modes`: full-pull, lazy-cold, lazy-prefetch, lazy-warm
- :mod:`lazyfs.bench.mountservice`: the ``lazyfs serve`` each lazy mode starts, "service up",
  mounts through it, no mount left behind
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
MODES = (FULL_PULL, LAZY_COLD, LAZY_PREFETCH, LAZY_WARM)
PROFILE_NAMES = ("loopback", "lan", "wan", "edge")
IMAGE_NAMES = ("python", "gcc", "busybox")
DEFAULT_IMAGES = ("python", "gcc")
