"""Code the tests share (imported as `tests.helpers.X`); fixtures live in the conftest.py files."""
