"""The straightforward CLOOB formulation the loss benchmark compares against.

Four independent Hopfield retrievals and InfoLOOB with the diagonal masked by -1000, as in the
reference implementation (ml-jku/cloob, src/training/methods.py), re-typed from the formulas in the
docstring of cloob/losses/full.py.
"""

import torch
import torch.nn.functional as F


def retrieve(state, stored, beta):
    return F.normalize(torch.softmax(beta * state @ stored.T, dim=-1) @ stored, dim=-1)


def infoloob(x, y, eye, inv_tau):
    tau = 1 / inv_tau
    k = x @ y.T / tau
    positives = -torch.mean(torch.sum(k * eye, dim=1))
    arg_lse = k * torch.logical_not(eye) + eye * -1000.0
    negatives = torch.mean(torch.logsumexp(arg_lse, dim=1))
    return tau * (positives + negatives)


def cloob_reference(x, y, inv_tau, beta):
    p_xx = retrieve(x, x, beta)
    p_yy = retrieve(y, y, beta)
    p_xy = retrieve(y, x, beta)
    p_yx = retrieve(x, y, beta)
    eye = torch.eye(x.shape[0], device=x.device) > 0.5
    return infoloob(p_xx, p_xy, eye, inv_tau) + infoloob(p_yy, p_yx, eye, inv_tau)
