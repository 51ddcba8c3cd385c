"""unlearn_many: one shared retain gradient, edits in order, joint verification, revertible deltas."""
import json

import pytest
import torch

import slug_fast
from slug_fast import digits
from slug_fast.delta import CONFIG_FILE, ORIGINALS_FILE
from slug_fast.errors import CriterionNotReached, DeltaError, SlugError
from slug_fast.gradients import GradientPass
from slug_fast.many import shared_retain_gradients

from test_unlearn import criterion_for, params_of

KEEP = (0, 1, 2, 4, 5, 6, 8, 9)


def many_sets(data, labels, seed=0):
    """Each digit's forget batches and one retain set of the digits none of them is."""
    from slug_fast.demo import pair_batches

    forgets = {}
    for label in labels:
        is_f = data.train_labels == label
        forgets[label] = pair_batches(data.train_images[is_f], data.train_labels[is_f], 32, seed)
    keep = ~torch.isin(data.train_labels, torch.tensor(labels))
    retain = pair_batches(data.train_images[keep], data.train_labels[keep], 64, seed + 1)
    return forgets, retain


def digit_concepts(data, labels):
    forgets, retain = many_sets(data, labels)
    return {digits.DIGIT_NAMES[k]: (forgets[k], criterion_for(data, k)) for k in labels}, retain


def equal_params(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def test_the_shared_retain_gradient_is_a_single_runs_bit_for_bit(digits_model, digits_trained):
    data = digits_trained[1]
    forgets, retain = many_sets(data, [3, 7])
    single = slug_fast.compute_gradients(digits_model, forgets[3], retain, slug_fast.clip_forget_loss,
                                         slug_fast.clip_retain_loss, progress=False)
    names = list(single.retain)
    shared = shared_retain_gradients(GradientPass(digits_model, None, retain, slug_fast.clip_forget_loss,
                                                  slug_fast.clip_retain_loss, names, progress=False))
    assert list(shared) == names
    assert all(torch.equal(shared[n], single.retain[n]) for n in names)


def test_one_concept_is_unlearn_bit_for_bit(digits_model, digits_trained):
    data = digits_trained[1]
    concepts, retain = digit_concepts(data, [3])
    forget, criterion = concepts["three"]
    other = digits.build_model(0)
    other.load_state_dict(digits_model.state_dict())
    single = slug_fast.unlearn(other.eval(), forget, retain, criterion, progress=False)
    many = slug_fast.unlearn_many(digits_model, concepts, retain, progress=False)
    got = many.concepts["three"]
    assert got.layers == single.layers and got.step == single.step and many.rounds == 0
    assert list(many.delta) == list(single.delta)
    assert all(torch.equal(many.delta[k], single.delta[k]) for k in single.delta)
    assert equal_params(params_of(digits_model), params_of(other))


def test_two_digits_forgotten_together_with_one_delta_that_reproduces_and_reverts(digits_model, digits_trained,
                                                                                 tmp_path):
    data = digits_trained[1]
    original = params_of(digits_model)
    concepts, retain = digit_concepts(data, [3, 7])
    result = slug_fast.unlearn_many(digits_model, concepts, retain, progress=False)

    assert result.order == ["three", "seven"] and result.interference.after[:3] == ["before", "three", "seven"]
    assert result.interference.satisfied[0] == [False, False]  # the trained model knows both digits
    assert result.interference.satisfied[-1] == [True, True]
    assert all(concepts[n][1](digits_model)[0] for n in concepts)  # every criterion on the final model
    # share_layers=False (the default): each concept edits its own tensors
    layers = [set(result.concepts[n].layers) for n in result.order]
    assert not layers[0] & layers[1]
    edited = params_of(digits_model)
    assert [n for n in original if not torch.equal(original[n], edited[n])] == \
        [n for n in original if n in layers[0] | layers[1]]

    result.save(tmp_path / "stack", revertible=True)
    config = json.loads((tmp_path / "stack" / CONFIG_FILE).read_text())
    assert config["method"] == "slug-many" and config["order"] == ["three", "seven"] and config["revertible"]
    assert [c["name"] for c in config["concepts"]] == ["three", "seven"]
    assert [c["step"] for c in config["concepts"]] == [result.concepts[n].step for n in result.order]
    assert config["slug_fast_version"] == slug_fast.__version__
    assert all(len(spec["base_sha256"]) == len(spec["result_sha256"]) == 64 for spec in config["tensors"].values())

    copy = digits.build_model(0)
    copy.load_state_dict(digits_trained[0])
    slug_fast.apply_delta(copy, tmp_path / "stack")
    assert equal_params(params_of(copy), edited)  # apply on the base reproduces the run bit for bit

    assert sorted(slug_fast.revert_delta(digits_model, tmp_path / "stack")) == sorted(result.edited)
    assert equal_params(params_of(digits_model), original)  # revert restores theta0 bit for bit


def test_revert_refuses_a_tampered_model_an_unapplied_one_and_a_delta_without_originals(digits_model,
                                                                                       digits_trained, tmp_path):
    data = digits_trained[1]
    concepts, retain = digit_concepts(data, [3])
    base = params_of(digits_model)
    result = slug_fast.unlearn_many(digits_model, concepts, retain, progress=False)
    result.save(tmp_path / "kept", revertible=True)
    result.save(tmp_path / "plain")
    assert not (tmp_path / "plain" / ORIGINALS_FILE).exists()
    with pytest.raises(DeltaError, match="saved without its original tensors.*drops the low-order bits"):
        slug_fast.revert_delta(digits_model, tmp_path / "plain")

    name = result.edited[0]
    with torch.no_grad():
        dict(digits_model.named_parameters())[name].view(-1)[0] += 1e-3  # one weight moved since
    tampered = params_of(digits_model)
    with pytest.raises(DeltaError, match=f"parameter '{name}' is not what this delta produced"):
        slug_fast.revert_delta(digits_model, tmp_path / "kept")
    assert equal_params(params_of(digits_model), tampered)

    fresh = digits.build_model(0)
    fresh.load_state_dict(digits_trained[0])
    with pytest.raises(DeltaError, match="is not what this delta produced"):
        slug_fast.revert_delta(fresh, tmp_path / "kept")  # never applied
    assert equal_params(params_of(fresh), base)


def test_a_single_unlearn_saved_revertible_reverts(digits_model, digits_trained, tmp_path):
    data = digits_trained[1]
    concepts, retain = digit_concepts(data, [7])
    forget, criterion = concepts["seven"]
    original = params_of(digits_model)
    slug_fast.unlearn(digits_model, forget, retain, criterion, progress=False).save(tmp_path / "d", revertible=True)
    assert not equal_params(params_of(digits_model), original)
    slug_fast.revert_delta(digits_model, tmp_path / "d")
    assert equal_params(params_of(digits_model), original)


def test_share_layers_lets_concepts_edit_one_tensor_and_their_changes_add_up(digits_model, digits_trained,
                                                                           tmp_path):
    data = digits_trained[1]
    original = params_of(digits_model)
    concepts, retain = digit_concepts(data, [3, 7])
    result = slug_fast.unlearn_many(digits_model, concepts, retain, share_layers=True, progress=False,
                                    order=["seven", "three"])
    assert result.order == ["seven", "three"] and result.share_layers
    assert all(concepts[n][1](digits_model)[0] for n in concepts)
    assert set(result.delta) == set(result.concepts["seven"].edited) | set(result.concepts["three"].edited)
    result.save(tmp_path / "d", revertible=True)
    copy = digits.build_model(0)
    copy.load_state_dict(digits_trained[0])
    slug_fast.apply_delta(copy, tmp_path / "d")
    assert equal_params(params_of(copy), params_of(digits_model))
    slug_fast.revert_delta(digits_model, tmp_path / "d")
    assert equal_params(params_of(digits_model), original)


class Line(torch.nn.Module):
    """y = w . x with w of shape (1, 2): two concepts pulling w along directions that oppose."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[1.0, 1.0]]))

    def forward(self, x):
        return self.lin(x).sum()


def push(model, batch):  # the forget loss rises along w's move towards the batch
    return model(batch)


def keep(model, batch):  # the retain loss: only w's second entry matters
    return model(batch)


def reach(x, by=1.0):
    """Criterion: w . x rose by at least `by` from the original weights [1, 1]."""
    start = float(torch.tensor([1.0, 1.0]) @ x)

    def criterion(model):
        value = float(model.lin.weight.detach()[0] @ x)
        return value >= start + by, {"rise": value - start}
    return criterion


def concept(forget, measured, by=1.0):
    """Forget batch `forget` (the direction its edit takes); the criterion is on w . `measured`."""
    return [torch.tensor(forget)], reach(torch.tensor(measured), by)


def line_many(model, concepts, **kw):
    return slug_fast.unlearn_many(model, concepts, [torch.tensor([0.0, 1.0])], forget_loss=push, retain_loss=keep,
                                  share_layers=True, progress=False, cache=False, **kw)


def weights_of(model):
    return model.lin.weight.detach()[0]


def test_verification_re_searches_a_concept_the_next_edit_undid():
    """B's edit (along (-0.5, 1)) pulls A's measure back; B's own measure (w_2) ignores A's move,
    so one re-search of A's step settles it."""
    model = Line()
    concepts = {"a": concept([1.0, 0.0], [1.0, 0.0]), "b": concept([-0.5, 1.0], [0.0, 1.0])}
    result = line_many(model, concepts)
    rows = dict(zip(result.interference.after, result.interference.satisfied))
    assert rows["before"] == [False, False] and rows["a"] == [True, False] and rows["b"] == [False, True]
    assert result.rounds == 1 and result.interference.after[-1] == "round 1" and rows["round 1"] == [True, True]
    assert result.concepts["a"].searches == 2 and result.concepts["b"].searches == 1
    before = result.concepts["a"].candidates[0].search.step  # the step the row after B's edit saw fail
    research = result.concepts["a"].researches[0].search
    assert research.start == research.trace[0].step == 2 * before and all(e.step > before for e in research.trace)
    assert all(c(model)[0] for _, c in concepts.values())
    steps = {n: result.concepts[n].step for n in ("a", "b")}
    # w = w0 + step_a * g_a + step_b * g_b, each g being its batch (d(w . x)/dw = x)
    expected = torch.tensor([1.0, 1.0]) + steps["a"] * torch.tensor([1.0, 0.0]) + steps["b"] * torch.tensor([-0.5, 1.0])
    assert torch.allclose(weights_of(model), expected, atol=1e-6)
    assert result.interference.values("rise")[0] == [0.0, 0.0]


def test_a_tug_of_war_is_settled_by_scaling_every_step_together():
    """A along e1; B along (-0.5, 1) measured on (-0.5, 1): each one's re-search undoes the other a
    little, and minimal steps only approach the joint solution; a common scale reaches it."""
    model = Line()
    concepts = {"a": concept([1.0, 0.0], [1.0, 0.0]), "b": concept([-0.5, 1.0], [-0.5, 1.0])}
    result = line_many(model, concepts, max_rounds=1)
    assert result.rounds == 1 and result.interference.after[-1].startswith("scaled x")
    assert result.interference.satisfied[-2] != [True, True] and result.interference.satisfied[-1] == [True, True]
    assert all(c(model)[0] for _, c in concepts.values())


def test_an_interference_no_step_can_settle_raises_with_the_model_unchanged():
    model = Line()
    concepts = {"a": concept([1.0, 0.0], [1.0, 0.0]), "b": concept([-1.0, 0.0], [-1.0, 0.0])}
    with pytest.raises(CriterionNotReached, match=r"after 2 verification round\(s\) and a common scale"):
        line_many(model, concepts, max_rounds=2)
    assert torch.equal(model.lin.weight.detach(), torch.tensor([[1.0, 1.0]]))


def opposed(b_first: float):
    return {"a": concept([1.0, 0.0], [1.0, 0.0]), "b": concept([b_first, 1.0], [b_first, 1.0])}


def test_without_share_layers_a_concept_with_no_layer_left_is_refused_untouched():
    model = Line()
    with pytest.raises(SlugError, match="concept 'b': every layer it could edit is taken by earlier concepts"):
        slug_fast.unlearn_many(model, opposed(-0.5), [torch.tensor([0.0, 1.0])], forget_loss=push,
                               retain_loss=keep, progress=False)
    assert torch.equal(model.lin.weight.detach(), torch.tensor([[1.0, 1.0]]))


def test_order_by_importance_puts_the_strongest_forget_gradient_first():
    model = Line()
    weak, strong = torch.tensor([0.5, 0.0]), torch.tensor([0.0, 3.0])
    result = line_many(model, {"weak": ([weak], reach(weak, 0.5)), "strong": ([strong], reach(strong, 0.5))},
                       order="importance")
    assert result.order == ["strong", "weak"]
    importance = {n: float(result.concepts[n].stats.importance.max()) for n in result.order}
    assert importance["strong"] > importance["weak"]


def test_apply_false_leaves_the_model_and_returns_the_stack(digits_model, digits_trained):
    data = digits_trained[1]
    original = params_of(digits_model)
    concepts, retain = digit_concepts(data, [3, 7])
    result = slug_fast.unlearn_many(digits_model, concepts, retain, apply=False, progress=False)
    assert not result.applied and equal_params(params_of(digits_model), original)
    assert result.interference.satisfied[-1] == [True, True] and set(result.delta) == set(result.edited)


@pytest.mark.parametrize("kwargs, message", [
    (dict(concepts={}), "concepts must be a non-empty mapping"),
    (dict(concepts={"a": [torch.ones(2)]}), r"concept 'a' must map to \(forget batches, criterion\)"),
    (dict(concepts={"a": ([torch.ones(2)], "not callable")}), "concept 'a': criterion must be callable"),
    (dict(concepts={"a": (iter([torch.ones(2)]), reach(torch.ones(2)))}), "one-shot iterator"),
    (dict(order="alphabetical"), r"order must be one of \('given', 'importance'\)"),
    (dict(order=["a"]), "order must list every concept exactly once"),
    (dict(max_rounds=-1), "max_rounds must be a non-negative integer"),
    (dict(memory_budget="0.5x"), "unlearn_many keeps each concept's gradients in memory"),
    (dict(strategy="fastest"), "strategy must be one of"),
])
def test_bad_input_is_refused_before_any_gradient(kwargs, message):
    model = Line()
    calls = []

    def counted(model, batch):
        calls.append(1)
        return push(model, batch)

    concepts = kwargs.pop("concepts", opposed(-0.5))
    with pytest.raises(SlugError, match=message):
        slug_fast.unlearn_many(model, concepts, [torch.tensor([0.0, 1.0])], forget_loss=counted, retain_loss=keep,
                               progress=False, **kwargs)
    assert calls == [] and torch.equal(model.lin.weight.detach(), torch.tensor([[1.0, 1.0]]))


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    from test_readme import readme_example

    from slug_fast.demo import demo_many_task

    _, example = readme_example("many")
    monkeypatch.chdir(tmp_path)
    shipped = {n: p.detach().clone() for n, p in demo_many_task("seven,three").model.named_parameters()}
    namespace = {"slug_fast": slug_fast}
    exec(compile(example, "README.md <!-- example: many -->", "exec"), namespace)
    result, task = namespace["result"], namespace["task"]
    assert result.interference.satisfied[-1] == [True, True]
    assert "[True, True]" in capsys.readouterr().out
    assert (tmp_path / "stack" / ORIGINALS_FILE).is_file()
    assert equal_params(params_of(task.model), shipped)  # reverted
