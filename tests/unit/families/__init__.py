"""Tests of the model families (a package, so its conftest and module names stay apart from tests/unit/trainer's)."""
