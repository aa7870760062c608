"""Epsilon from Google's dp-accounting (PyPI) for each case on stdin.

Input: a JSON list of [noise_multiplier, sampling_rate, rounds, delta].
Output: a JSON list of epsilons, in the same order (null where it is infinite).
"""
import json
import math
import sys

import dp_accounting

out = []
for z, q, rounds, delta in json.load(sys.stdin):
    acc = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    eps = acc.get_epsilon(delta)
    out.append(None if math.isinf(eps) else eps)
json.dump(out, sys.stdout)
