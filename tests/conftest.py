"""Fixtures shared by the test modules: the hub-layout weights of tests/hub_fixtures.py, a cache
directory per module, a free port."""

import socket

import pytest
from hub_fixtures import bert_dir, hub_root, open_clip_file, opt_dir, t5_dir  # noqa: F401 - pytest fixtures


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache_dir per test module: synthetic shards and tiny tokenizers, built once per module."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def free_port():
    """A TCP port free on 127.0.0.1 now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
