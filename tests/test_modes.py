"""training_state sets modes, requires_grad and .grad for a block and restores each exactly."""
import pytest
import torch

from slug_fast.modes import training_state


def model_in_a_mixed_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.Linear(3, 1)))
    model.train()
    model[1].eval()  # a submodule in its own mode
    model[0].bias.requires_grad_(False)
    model[2][0].weight.grad = torch.full((1, 3), 7.0)
    return model


def state(model):
    return ([m.training for m in model.modules()],
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()})


def same(a, b):
    return a[0] == b[0] and a[1] == b[1] and all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a[2].values(), b[2].values()))


@pytest.mark.parametrize("fail", [False, True])
def test_everything_is_set_inside_and_restored_after(fail):
    model = model_in_a_mixed_state()
    before = state(model)
    grad_object = model[2][0].weight.grad
    with pytest.raises(RuntimeError) if fail else torch.no_grad():
        with training_state(model, train=False, requires_grad={"0.weight"}, clear_grads=True) as named:
            assert set(named) == {"0.weight", "0.bias", "2.0.weight", "2.0.bias"}
            assert not any(m.training for m in model.modules())
            assert {n: p.requires_grad for n, p in model.named_parameters()} == {
                "0.weight": True, "0.bias": False, "2.0.weight": False, "2.0.bias": False}
            assert all(p.grad is None for p in model.parameters())
            if fail:
                raise RuntimeError("inside")
    assert same(state(model), before) and model[2][0].weight.grad is grad_object


def test_true_and_false_mean_all_and_none():
    model = model_in_a_mixed_state()
    with training_state(model, requires_grad=True):
        assert all(p.requires_grad for p in model.parameters())
    with training_state(model, requires_grad=False):
        assert not any(p.requires_grad for p in model.parameters())
    assert model[0].bias.requires_grad is False and model[0].weight.requires_grad is True


def test_what_is_not_asked_for_is_left_alone():
    model = model_in_a_mixed_state()
    before = state(model)
    with training_state(model):
        assert same(state(model), before)
    with training_state(model, train=True):
        assert all(m.training for m in model.modules())
        assert model[2][0].weight.grad is not None and model[0].bias.requires_grad is False
    assert same(state(model), before)


def test_a_string_of_names_is_refused():
    with pytest.raises(TypeError, match="collection of parameter names"):
        with training_state(torch.nn.Linear(1, 1), requires_grad="weight"):
            pass
