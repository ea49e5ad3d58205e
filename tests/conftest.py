"""Fixtures shared by every test module: the hub-layout weights of tests/hub_fixtures.py."""

from hub_fixtures import bert_dir, hub_root, open_clip_file, opt_dir, t5_dir  # noqa: F401 - pytest fixtures
