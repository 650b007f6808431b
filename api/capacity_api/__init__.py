"""Shared, I/O-free core of Capacity Platform: CRD models, quantities and gate math."""

GROUP = "capacity.platform.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

__all__ = ["API_VERSION", "GROUP", "VERSION"]
