"""Accord: keeps customer master data in accord across CRM, billing and support."""

__version__ = "0.1.0"
