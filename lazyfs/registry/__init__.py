"""Async OCI distribution client: manifests, blobs, ranges, uploads, and the auth flow."""
