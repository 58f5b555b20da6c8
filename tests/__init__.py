"""The test suite: unit/ (fast, no build or emulator), integration/ (the compiler end to end), service/ (the server
and fleet), helpers/ (shared code, imported as `tests.helpers.X`), corpus/ (the committed model corpus)."""
