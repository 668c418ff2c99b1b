"""Adapter modules that PEFT does not provide, written here (see each module for why)."""
