"""zstd:chunked layers: TOC model, tar-split, and the layer writer."""
