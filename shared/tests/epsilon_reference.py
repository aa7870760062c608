"""Epsilon from Google's dp-accounting (PyPI) for each case on stdin.

Input: a JSON list of [noise_multiplier, sampling_rate, rounds, delta].
Output: a JSON list of epsilons, in the same order (null where it is infinite).
The cases are shared among one process for each core this process may run on (28 s on
one core for the test's 300, 19 s on two); one core, or no working process pool (a
sandbox without POSIX semaphores), computes them here in turn.
"""
import json
import math
import multiprocessing
import os
import sys

import dp_accounting


def epsilon(case):
    z, q, rounds, delta = case
    acc = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    eps = acc.get_epsilon(delta)
    return None if math.isinf(eps) else eps


if __name__ == "__main__":
    cases = json.load(sys.stdin)
    cores = min(len(os.sched_getaffinity(0)), len(cases))
    out = None
    if cores > 1:
        try:
            # Forked workers share the parent's imports (a fresh interpreter each would
            # import numpy and scipy again).
            with multiprocessing.get_context("fork").Pool(cores) as pool:
                out = pool.map(epsilon, cases, chunksize=1)
        except OSError:
            out = None
    if out is None:
        out = [epsilon(c) for c in cases]
    json.dump(out, sys.stdout)
