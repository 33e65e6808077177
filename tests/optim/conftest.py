"""Helpers of the optimizer tests."""


def fit(layer, opt, X, y, steps: int) -> list[float]:
    """``steps`` full-batch steps of ``opt`` on the mean squared error of ``layer(X)`` against ``y``; the
    loss of each step, before its update."""
    losses = []
    for _ in range(steps):
        loss = (layer(X) - y).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses
