# lazyfs in a container. Build and run it with docker-compose.yml (see there).
#
# NOTE: not built on the development machines or in CI: they have the docker CLI but no
# Docker engine. It is meant for machines that have one.
FROM python:3.11-slim-bookworm

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# fuse3: fusermount3 and /etc/fuse.conf; libfuse3-dev, pkg-config, gcc (+ libc6-dev, which gcc
# only recommends): pyfuse3 is compiled against libfuse3 at install time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 libfuse3-dev pkg-config gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .
RUN pip install . \
 && mkdir -p /var/cache/lazyfs /mnt/lazyfs

ENTRYPOINT ["lazyfs"]
CMD ["--help"]
