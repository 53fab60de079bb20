import re

import numpy as np
import pytest

from street2shop.errors import ConfigError, ModelError, check_positive_int


@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.uint8(2)])
def test_a_positive_int_passes_as_a_plain_int(value):
    got = check_positive_int("n", value)
    assert got == int(value) and type(got) is int


@pytest.mark.parametrize("value", [0, -1, True, 2.0, "3", None, np.float32(2)])
def test_anything_else_is_refused_with_the_name_and_the_value(value):
    with pytest.raises(ConfigError, match="^" + re.escape(f"n must be a positive int. Received: n={value!r}") + "$"):
        check_positive_int("n", value)


def test_none_where_allowed_a_minimum_and_another_error():
    assert check_positive_int("n", None, allow_none=True) is None
    with pytest.raises(ConfigError, match=r"must be a positive int or None\. Received: n=0"):
        check_positive_int("n", 0, allow_none=True)
    assert check_positive_int("seed", 0, minimum=0) == 0
    with pytest.raises(ConfigError, match=r"seed must be an int >= 0\. Received: seed=-1"):
        check_positive_int("seed", -1, minimum=0)
    with pytest.raises(ModelError, match="version must be a positive int"):
        check_positive_int("version", 0, error=ModelError)
