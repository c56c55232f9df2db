"""kvrouter's HTTP gateway, routing policy, command line and process supervisor."""

__version__ = "0.1.0"
