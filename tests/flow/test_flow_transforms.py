"""arcsinh and logicle on known values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from leukoscope.flow.transforms import arcsinh, arcsinh_inverse, logicle, logicle_inverse


def test_arcsinh_known_values():
    x = np.array([0.0, 5.0, -5.0, 150.0, 1e4])
    y = arcsinh(x, cofactor=5.0)
    np.testing.assert_allclose(y[:3], [0.0, math.log(1 + math.sqrt(2)), -math.log(1 + math.sqrt(2))], rtol=1e-12)
    np.testing.assert_allclose(y[3], math.log(30 + math.sqrt(901)), rtol=1e-12)  # asinh(30)
    np.testing.assert_allclose(y[4], math.log(2 * 1e4 / 5), rtol=1e-6)  # ~ ln(2 x / c) for large x
    np.testing.assert_allclose(arcsinh_inverse(y, 5.0), x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(arcsinh(np.array([150.0]), cofactor=150.0), [math.asinh(1.0)], rtol=1e-12)
    with pytest.raises(ValueError, match="cofactor must be > 0, got 0"):
        arcsinh(x, cofactor=0)


def test_logicle_known_values():
    t, m, w, a = 262144.0, 4.5, 0.5, 0.0
    y = logicle(np.array([0.0, t]), t=t, m=m, w=w, a=a)
    np.testing.assert_allclose(y, [(w + a) / (m + a), 1.0], rtol=1e-6)  # zero sits at (W + A) / (M + A)
    x = np.array([-1000.0, -10.0, 10.0, 1000.0, 1e5])
    yx = logicle(x, t=t, m=m, w=w, a=a)
    assert np.all(np.diff(yx) > 0)
    # symmetric about zero: y(-x) = 2 y(0) - y(x)
    np.testing.assert_allclose(logicle(-x, t=t, m=m, w=w, a=a), 2 * (w / m) - yx, rtol=1e-6)
    # far above the linear zone one decade spans 1/M of the scale (0.2 % off at T, 0.4 % at T / 2.6)
    top = logicle(np.array([t, t / 10, 1e5, 1e4]), t=t, m=m, w=w, a=a)
    np.testing.assert_allclose([top[0] - top[1], top[2] - top[3]], [1 / m, 1 / m], rtol=5e-3)
    assert abs(top[0] - top[1] - 1 / m) < abs(top[2] - top[3] - 1 / m)  # and approaches it from above
    np.testing.assert_allclose(logicle_inverse(yx, t=t, m=m, w=w, a=a), x, rtol=1e-6)
    assert logicle(np.zeros((3, 2)), t=1e4, m=4.0, w=0.5).shape == (3, 2)


def test_logicle_rejects_bad_parameters():
    with pytest.raises(ValueError, match=r"W=3.0"):
        logicle(np.array([1.0]), t=1e4, m=4.5, w=3.0)
