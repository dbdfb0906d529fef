"""Sizes as people write them."""

import pytest

from flexgen_dist import UserError
from flexgen_dist.sizes import format_size, parse_size

MiB = 2**20


@pytest.mark.parametrize("text, value", [("4G", 4 * 2**30), ("512MiB", 512 * MiB), ("1.5k", 1536), ("100", 100), ("2 GB", 2 * 1000**3)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_nonsense():
    with pytest.raises(UserError, match="not a size"):
        parse_size("lots", "--gpu-mem")
    assert format_size(3 * MiB) == "3.00 MiB"
