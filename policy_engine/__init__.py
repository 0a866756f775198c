"""A policy decision point for an agent credential broker."""

__version__ = "0.1.0"
