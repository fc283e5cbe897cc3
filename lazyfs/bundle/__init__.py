"""Bundles: images carried to nodes without a link (docs/bundles.md).

Owns the bundle format (format.py), the inventory of what a node has (inventory.py), export
(export.py: metadata and the chunks a target lacks, in profile order) and import (importer.py:
everything verified against its digest before any of it is admitted).

May import: model, localfiles, formats, cache, registry, convert, mount. Never: service, cli.
"""
