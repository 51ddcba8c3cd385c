"""pareto_front against an O(n^2) brute force, and the layer-choice helpers on top of it."""
import re

import numpy as np
import pytest
import torch

import slug_fast
from slug_fast.errors import SlugError
from slug_fast.pareto import deepest, is_eligible, split_towers

from conftest import available

BACKENDS = available(["cpp", "torch"])


def brute_force(a, m):
    """Indices no other index strictly dominates; NaN never on the front (chunked O(n^2))."""
    a, m = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(m, dtype=torch.float64)
    ok = ~(a.isnan() | m.isnan())
    front = []
    for start in range(0, len(a), 2048):
        ai, mi = a[start:start + 2048, None], m[start:start + 2048, None]
        dominated = ((a[None, :] < ai) & (m[None, :] > mi)).any(dim=1)
        front += (torch.nonzero(~dominated & ok[start:start + 2048]).flatten() + start).tolist()
    return front


def random_points(n, gen, levels=None, nan_fraction=0.0):
    if levels:  # few distinct values: many ties and exact duplicates
        a = torch.randint(0, levels, (n,), generator=gen).double() / levels
        m = torch.randint(0, levels, (n,), generator=gen).double()
    else:
        a, m = torch.rand(n, generator=gen, dtype=torch.float64), torch.rand(n, generator=gen, dtype=torch.float64)
    if nan_fraction:
        a[torch.rand(n, generator=gen) < nan_fraction] = float("nan")
        m[torch.rand(n, generator=gen) < nan_fraction] = float("nan")
    return a, m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 100, 1000])
@pytest.mark.parametrize("levels", [None, 2, 5])
@pytest.mark.parametrize("nan_fraction", [0.0, 0.2])
def test_matches_brute_force(backend, n, levels, nan_fraction, gen):
    for _ in range(5):
        a, m = random_points(n, gen, levels, nan_fraction)
        assert slug_fast.pareto_front(a, m, backend=backend) == brute_force(a, m)


def test_hundred_thousand_points_every_backend(gen):
    a, m = random_points(100_000, gen, levels=300, nan_fraction=0.01)
    expected = brute_force(a, m)  # about 30 s: computed once for every backend
    for backend, reason in slug_fast.backends().items():
        if reason is None and backend != "triton":
            assert slug_fast.pareto_front(a, m, backend=backend) == expected, backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_known_answers(backend):
    front = lambda a, m: slug_fast.pareto_front(a, m, backend=backend)  # noqa: E731
    assert front([], []) == []
    assert front([0.5], [1.0]) == [0]
    assert front([0.1, 0.2, 0.3], [1.0, 2.0, 3.0]) == [0, 1, 2]  # a trade-off curve: all kept
    assert front([0.1, 0.2, 0.3], [3.0, 2.0, 1.0]) == [0]  # best on both axes dominates the rest
    assert front([0.2, 0.2, 0.2], [1.0, 1.0, 1.0]) == [0, 1, 2]  # duplicates all kept
    assert front([0.1, 0.2], [1.0, 1.0]) == [0, 1]  # equal importance: not strictly dominated
    assert front([float("nan"), 0.5, 0.4], [9.0, float("nan"), 0.0]) == [2]
    assert front([0.1, 0.2], [-float("inf"), float("inf")]) == [0, 1]
    assert front(torch.tensor([0.3, 0.1], dtype=torch.float32), (1.0, 2.0)) == [1]
    # Python floats 1e-10 apart, equal once rounded to float32: layer 1 is strictly dominated
    assert front([0.5, 0.5 + 1e-10], [1.0 + 1e-10, 1.0]) == [0]
    assert front((0.5, 0.5 + 1e-10), np.array([1.0 + 1e-10, 1.0])) == [0]
    assert front(torch.tensor([3, 1, 2]), torch.tensor([1, 2, 3], dtype=torch.int32)) == [1, 2]  # integer tensors
    assert front(np.array([2, 1], dtype=np.int16), [1.5, 0.5]) == [0, 1]


def test_length_mismatch_is_refused():
    with pytest.raises(SlugError, match="alignment has 2 values but importance has 3"):
        slug_fast.pareto_front([0.1, 0.2], [1, 2, 3])


def test_eligibility_follows_slug_rules():
    assert is_eligible("visual.transformer.resblocks.3.attn.in_proj_weight", (192, 64))
    assert is_eligible("visual.conv1.weight", (64, 3, 4, 4)) and is_eligible("text_projection", (64, 32))
    for name in ["visual.ln_pre.weight", "token_embedding.weight", "positional_embedding", "logit_scale",
                 "vision_model.post_layernorm.weight", "mlp.c_fc.bias", "visual.class_embedding"]:
        assert not is_eligible(name, (64, 64)), name
    assert not is_eligible("visual.proj", (64,))


def test_eligibility_ignores_case():
    """BERT-style capitalised names are excluded like lower-case ones."""
    for name in ["encoder.layer.0.attention.output.LayerNorm.weight", "embeddings.Position_Embeddings.weight",
                 "head.Bias", "LN_final.weight", "Logit_Scale"]:
        assert not is_eligible(name, (64, 64)), name
    assert is_eligible("encoder.layer.0.attention.output.Dense.weight", (64, 64))


def test_split_towers_and_depth():
    names = ["visual.a.weight", "visual.b.weight", "transformer.c.weight", "text_projection"]
    towers = split_towers(names, {"vision": "visual.", "text": lambda n: True})  # first matching rule wins
    assert towers == {"vision": ["visual.a.weight", "visual.b.weight"],
                      "text": ["transformer.c.weight", "text_projection"]}
    # visual.b.weight matches all three rules and goes to the first only
    assert split_towers(names, {"v": re.compile(r"\.b\."), "visual": "visual.", "rest": lambda n: True}) == {
        "v": ["visual.b.weight"], "visual": ["visual.a.weight"], "rest": ["transformer.c.weight", "text_projection"]}
    with pytest.raises(SlugError, match="tower rule for 'audio' matches no eligible parameter"):
        split_towers(names, {"audio": "audio.", "all": lambda n: True})
    assert split_towers(names, {"audio": "audio.", "all": lambda n: True}, allow_empty=True)["audio"] == []
    assert deepest(["b", "a"], ["a", "b", "c"]) == "b"


def test_deepest_follows_depth_order_not_names():
    """The last candidate in depth order, whatever the names sort as; a name the order lacks
    ranks below every known one, and ties keep the first candidate."""
    order = ["z.weight", "m.weight", "a.weight"]  # input to output, against alphabetical order
    assert deepest(["z.weight", "a.weight", "m.weight"], order) == "a.weight"
    assert deepest(["m.weight", "z.weight"], order) == "m.weight"
    assert deepest(["unknown", "z.weight"], order) == "z.weight"  # unknown below position 0
    assert deepest(["unknown", "m.weight"], order) == "m.weight"
    assert deepest(["q", "p"], order) == "q"  # neither known: the first


def test_a_predicate_rule_sees_the_name():
    assert split_towers(["enc.a.weight", "dec.b.weight"], {"enc": lambda n: n.startswith("enc."),
                                                            "dec": lambda n: "dec" in n}) == {
        "enc": ["enc.a.weight"], "dec": ["dec.b.weight"]}


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_fronts_on_a_noisy_trade_off_curve(backend, gen):
    a = torch.rand(3000, generator=gen, dtype=torch.float64)
    m = (a + 1e-3 * torch.randn(3000, generator=gen, dtype=torch.float64)).round(decimals=3)  # ties
    a = a.round(decimals=3)
    expected = brute_force(a, m)
    assert len(expected) > 100
    assert slug_fast.pareto_front(a, m, backend=backend) == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_must_be_one_dimensional_real_sequences(backend):
    front = lambda a, m: slug_fast.pareto_front(a, m, backend=backend)  # noqa: E731
    with pytest.raises(SlugError, match=r"alignment must be 1-D \(one value per layer\); got shape \(2, 3\)"):
        front(torch.zeros(2, 3), torch.zeros(3, 2))  # once flattened silently to 6 against 6
    with pytest.raises(SlugError, match=r"importance must be 1-D .* got shape \(3, 2\)"):
        front(torch.zeros(6), torch.zeros(3, 2))
    with pytest.raises(SlugError, match=r"got shape \(\)"):
        front(0.5, [1.0])
    with pytest.raises(SlugError, match="alignment must be a 1-D sequence of numbers; got list"):
        front(["a", "b"], [1.0, 2.0])
    with pytest.raises(SlugError, match="importance must be a 1-D sequence of numbers; got str"):
        front([0.1, 0.2], "ab")
    with pytest.raises(SlugError, match="importance must be a 1-D sequence of numbers; got NoneType"):
        front([0.1], None)
    with pytest.raises(SlugError, match="alignment must hold real numbers; got dtype torch.bool"):
        front([True, False], [1.0, 2.0])
    assert front(torch.tensor([3, 1]), [1.0, 2.0]) == [1]  # integers are numbers
    assert front([float("nan"), 0.2], [1.0, 2.0]) == [1]  # NaN still just left off the front
