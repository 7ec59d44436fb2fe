"""The library under the commands at the repository's root (README.md beside this file)."""
