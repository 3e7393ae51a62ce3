"""Test utilities that ship with peftfast (ahead-of-time kernel compilation checks)."""
