"""Test-side names for the mosquitto launcher (it lives in simulators/broker.py, shared with the demo)."""

from simulators.broker import MosquittoBroker, find_mosquitto
from simulators.ports import free_port

__all__ = ["MosquittoBroker", "find_mosquitto", "free_port"]
