"""Budget rules: top-k and the cumulative threshold (minimal set), clamps and per-head budgets."""

import itertools

import pytest
import torch

from spattn.selectors import top_k, top_p


def _rows(seed, shape=(2, 3, 4, 7)):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(shape, generator=g) ** 3
    avail = torch.rand(shape, generator=g) > 0.3
    kept = torch.rand(shape, generator=g) > 0.8
    s = s / s.sum(-1, keepdim=True)
    return s.double(), avail & ~kept, (s.double() * kept).sum(-1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mass", [0.3, 0.7, 0.95, 1.0])
def test_top_p_is_minimal(seed, mass):
    scores, avail, kept_mass = _rows(seed)
    sel = top_p(scores, avail, mass, kept_mass=kept_mass)
    assert not (sel & ~avail).any()
    for idx in itertools.product(*(range(n) for n in scores.shape[:-1])):
        s, a, km, chosen = scores[idx], avail[idx], float(kept_mass[idx]), sel[idx]
        cand = [c for c in range(s.shape[0]) if a[c] and s[c] > 0]
        reach = km + float(s[chosen].sum())
        best = None  # brute force: smallest subset reaching the target (or all candidates if none does)
        for r in range(len(cand) + 1):
            if any(km + sum(float(s[c]) for c in sub) >= mass * (1 - 1e-12) for sub in itertools.combinations(cand, r)):
                best = r
                break
        if best is None:
            assert int(chosen.sum()) == len(cand)
        else:
            assert int(chosen.sum()) == best
            assert reach >= mass * (1 - 1e-9)


def test_top_k_picks_the_best_available():
    scores, avail, _ = _rows(7)
    sel = top_k(scores, avail, 3)
    masked = torch.where(avail, scores, -1.0)
    assert (sel.sum(-1) == torch.clamp(avail.sum(-1), max=3)).all()
    worst_chosen = torch.where(sel, masked, 2.0).amin(-1)
    best_left = torch.where(avail & ~sel, masked, -1.0).amax(-1)
    assert (worst_chosen >= best_left).all()


def test_per_head_budgets_and_clamps():
    scores, avail, kept_mass = _rows(3)
    avail = torch.ones_like(avail)
    sel = top_k(scores, avail, [1, 2, 5])
    assert sel.sum(-1).tolist() == [[[1] * 4, [2] * 4, [5] * 4]] * 2
    sel = top_p(scores, avail, [0.1, 0.5, 1.0])
    assert (sel[:, 0].sum(-1) <= sel[:, 2].sum(-1)).all()
    assert (sel[:, 2].sum(-1) == 7).all()
    assert (top_p(scores, avail, 0.01, min_blocks=3).sum(-1) == 3).all()
    assert (top_p(scores, avail, 1.0, max_blocks=2).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="per-head"):
        top_k(scores, avail, [1, 2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_keys_is_the_best_density_prefix_within_the_budget(seed):
    from spattn.selectors import top_keys

    g = torch.Generator().manual_seed(seed)
    gain = torch.rand(2, 3, 5, 6, generator=g)
    cost = torch.randint(1, 9, (1, 1, 5, 6), generator=g).float()
    available = torch.rand(2, 3, 5, 6, generator=g) > 0.3
    pairs = 20.0  # per head: 3 heads share 60
    chosen = top_keys(gain, available, cost, pairs)
    assert not (chosen & ~available).any()
    for b in range(2):
        c = cost.expand_as(gain)[b]
        spent = float(c[chosen[b]].sum())
        assert spent <= pairs * 3
        density = gain[b] / c
        taken, left = density[chosen[b]], density[available[b] & ~chosen[b]]
        if taken.numel() and left.numel():
            assert taken.min() >= left.max()  # a prefix of the density order
            nxt = int(torch.where(available[b] & ~chosen[b], density, -1.0).flatten().argmax())
            assert spent + float(c.flatten()[nxt]) > pairs * 3  # and the next one would not fit
