"""OCI platforms (``os/architecture[/variant]``): parsing, host detection and matching.

Matching follows containerd's normalisation so that an index entry ``linux/arm64`` is found for
a host that calls itself ``linux/arm64/v8``, and ``linux/arm`` for ``linux/arm/v7``.

A pure leaf: the only outside input is :func:`platform.machine`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from lazyfs.errors import ManifestError, UsageError

_COMPONENT_RE = re.compile(r"[a-z0-9_.-]+")

# User-facing spellings of architectures -> (OCI architecture, implied variant or None).
_ARCH_ALIASES: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "x86-64": ("amd64", None),
    "aarch64": ("arm64", None),
    "i386": ("386", None),
    "i686": ("386", None),
    "armhf": ("arm", "v7"),
    "armel": ("arm", "v6"),
}
_OS_ALIASES = {"macos": "darwin"}

# platform.machine() values (uname -m) -> (OCI architecture, variant).
_MACHINE_TO_ARCH: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv8l": ("arm", "v8"),
    "armv7l": ("arm", "v7"),
    "armv7": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "armv5tejl": ("arm", "v5"),
    "i386": ("386", None),
    "i486": ("386", None),
    "i586": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "ppc64": ("ppc64", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
    "loongarch64": ("loong64", None),
    "mips64": ("mips64", None),
}

# Variants that mean "the baseline" and so compare equal to no variant at all.
_DEFAULT_VARIANTS: dict[str, str] = {"amd64": "v1", "arm64": "v8", "arm": "v7"}
_VARIANT_SPELLINGS: dict[str, str] = {"v8.0": "v8", "v9.0": "v9"}


@dataclass(frozen=True)
class Platform:
    """An OCI platform triple; ``variant`` is None when unspecified."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/arch[/variant]``, accepting common aliases such as ``x86_64``."""
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(_COMPONENT_RE.fullmatch(p) for p in parts):
            raise UsageError(
                f"invalid platform {text!r}: expected os/architecture[/variant], "
                "e.g. linux/amd64 or linux/arm64/v8"
            )
        os_name = _OS_ALIASES.get(parts[0], parts[0])
        architecture, implied_variant = _ARCH_ALIASES.get(parts[1], (parts[1], None))
        variant = _spell_variant(parts[2]) if len(parts) == 3 else implied_variant
        return cls(os_name, architecture, variant)

    @classmethod
    def host(cls) -> Platform:
        """The platform of this machine; unknown machines keep their ``uname -m`` name."""
        import platform as _stdlib_platform  # here: the CLI client never needs it

        machine = _stdlib_platform.machine().lower()
        architecture, variant = _MACHINE_TO_ARCH.get(machine, (machine, None))
        return cls("linux", architecture, variant)

    @classmethod
    def from_json(cls, obj: Mapping[str, object]) -> Platform:
        """Read the ``platform`` object of an OCI index entry."""
        os_name = obj.get("os")
        architecture = obj.get("architecture")
        variant = obj.get("variant")
        if not isinstance(os_name, str) or not os_name:
            raise ManifestError(f"platform has no valid 'os': {_shown(os_name)}")
        if not isinstance(architecture, str) or not architecture:
            raise ManifestError(f"platform has no valid 'architecture': {_shown(architecture)}")
        if variant is not None and not isinstance(variant, str):
            raise ManifestError(f"platform 'variant' is not a string: {_shown(variant)}")
        return cls(os_name, architecture, variant or None)

    def matches(self, other: Platform) -> bool:
        """Same os and architecture, and the same variant once defaults are filled in."""
        return (
            self.os == other.os
            and self.architecture == other.architecture
            and self._canonical_variant() == other._canonical_variant()
        )

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return base if self.variant is None else f"{base}/{self.variant}"

    def _canonical_variant(self) -> str | None:
        if self.variant is None:
            return _DEFAULT_VARIANTS.get(self.architecture)
        return _spell_variant(self.variant)


def _shown(value: object) -> str:
    """``value`` for a one-line message: its repr, cut short (it comes from an image)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:79] + "…"


def _spell_variant(variant: str) -> str:
    """Write variants the OCI way: ``7`` -> ``v7``, ``v8.0`` -> ``v8``."""
    variant = variant.lower()
    if variant.isascii() and variant.isdigit():
        variant = f"v{variant}"
    return _VARIANT_SPELLINGS.get(variant, variant)
