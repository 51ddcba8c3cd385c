"""SlugConfig (unlearn's settings as one checked record) and DeltaConfig (delta_config.json, typed)."""
import dataclasses
import inspect
import json
import re
import warnings
from pathlib import Path

import pytest
import torch

import slug_fast
from slug_fast import DeltaConfig, SlugConfig
from slug_fast.delta import CONFIG_FILE
from slug_fast.errors import CriterionNotReached, DeltaError, SlugError


class Twin(torch.nn.Module):
    """Two towers by open_clip's naming (visual.* and the rest), small enough to run in a blink."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.visual = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6),
                                          torch.nn.Tanh(), torch.nn.Linear(6, 3))
        self.text = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))

    def forward(self, x):
        return self.visual(x) + self.text(x)


XF = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
XR = torch.randn(64, 4, generator=torch.Generator().manual_seed(2))


class Counting:
    """The losses of a Twin, counting their calls (none may happen before the settings are checked)."""

    def __init__(self):
        self.calls = 0

    def forget(self, m, x):
        self.calls += 1
        return -m(x)[:, 0].mean()  # ascending it lowers output 0 on the forget inputs

    def retain(self, m, x):
        self.calls += 1
        return m(x).pow(2).mean()


def lowered(m):
    with torch.no_grad():
        return m(XF)[:, 0].mean().item() < BEFORE - 0.3


with torch.no_grad():
    BEFORE = Twin()(XF)[:, 0].mean().item()


def run(model=None, criterion=lowered, **kw):
    losses = Counting()
    model = model if model is not None else Twin()
    result = slug_fast.unlearn(model, [XF], [XR], criterion, forget_loss=losses.forget, retain_loss=losses.retain,
                               progress=False, **kw)
    return result, losses


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# 1. SlugConfig: the settings, checked in one place before any gradient pass

CHOSEN = dict(strategy="deepest", tower="vision", group=True, max_evals=4, cache=False, backend="torch",
              store="chunked", passes=2, checkpointing=False, partition="owner")


def test_config_and_keywords_run_the_same_and_the_settings_take_effect():
    default, _ = run(apply=False)
    assert default.memory.mode == "full" and len(default.fronts["vision"]) > 1 and len(default.candidates) > 1
    by_keywords, _ = run(apply=False, **CHOSEN)
    by_config, _ = run(apply=False, config=SlugConfig(**CHOSEN))
    for res in (by_keywords, by_config):
        # what the settings ask for, seen from outside the settings record
        assert res.memory.mode == "chunked" and len(res.memory.groups) == 2
        assert res.stats.names and all(n.startswith("visual.") for n in res.stats.names)
        front = res.fronts["vision"]
        assert list(res.fronts) == ["vision"] and len(res.candidates) == 1
        assert res.layers == [max(front, key=[n for n, _ in Twin().named_parameters()].index)]  # the deepest
        assert res.backends["stats"] == "torch" and res.backends["edit"] == "torch"
        assert res.config == SlugConfig(**CHOSEN)
    assert by_config.layers == by_keywords.layers and by_config.step == by_keywords.step
    assert all(torch.equal(by_config.delta[n], by_keywords.delta[n]) for n in by_keywords.delta)


def test_max_evals_from_a_config_bounds_every_search():
    calls = [0]

    def never(m):
        calls[0] += 1
        return False

    model = Twin()
    original = params_of(model)
    with pytest.raises(CriterionNotReached, match="never held within 3 evaluations") as err:
        run(model, never, config=SlugConfig(max_evals=3))
    assert calls[0] == 3 * len(err.value.searches) and all(len(s.trace) == 3 for s in err.value.searches)
    assert all(torch.equal(p.detach(), original[n]) for n, p in model.named_parameters())


def test_result_config_resolves_group_to_the_adapters_default():
    res, _ = run()
    assert res.config == SlugConfig(group=False)  # the generic adapter moves single tensors
    assert run(config=SlugConfig(max_evals=7))[0].config == SlugConfig(max_evals=7, group=False)


BAD = [
    (dict(strategy="fastest"), r"strategy must be one of \('best', 'deepest'\), got 'fastest'"),
    (dict(tower=5), "tower must be a tower name or a non-empty list of names, got 5"),
    (dict(tower=[]), r"tower must be a tower name or a non-empty list of names, got \[\]"),
    (dict(group="yes"), r"group must be one of \(None, True, False\), got 'yes'"),
    (dict(max_evals=0), "max_evals must be a positive integer, got 0"),
    (dict(max_evals=True), "max_evals must be a positive integer, got True"),
    (dict(cache="all"), "cache must be True, False or 'linear', got 'all'"),
    (dict(backend="cuda"), r"backend must be 'auto' or one of \('cpp', 'triton', 'torch'\), got 'cuda'"),
    (dict(memory_budget="12 parsecs"), "memory_budget is bytes"),
    (dict(store="disk"), "store must be one of"),
    (dict(passes=2), "passes= sets the chunked store's number of passes; pass store='chunked'"),
    (dict(store="chunked", passes=0), "passes must be a positive integer, got 0"),
    (dict(checkpointing="yes"), r"checkpointing must be one of \(True, False\), got 'yes'"),
    (dict(partition="half"), r"partition must be one of \('owner', 'replicated'\), got 'half'"),
]


@pytest.mark.parametrize("settings, match", BAD)
def test_bad_settings_are_refused_the_same_both_ways_before_any_gradient(settings, match):
    with pytest.raises(SlugError, match=match):
        SlugConfig(**settings)
    model = Twin()
    original = params_of(model)
    losses = Counting()
    with pytest.raises(SlugError, match=match):
        slug_fast.unlearn(model, [XF], [XR], lowered, forget_loss=losses.forget, retain_loss=losses.retain,
                          progress=False, **settings)
    assert losses.calls == 0 and all(torch.equal(p.detach(), original[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("config, keywords", [
    (SlugConfig(strategy="deepest"), dict(strategy="deepest")),  # the same value given twice is still twice
    (SlugConfig(strategy="deepest"), dict(max_evals=5)),  # a config holds every setting, defaults included
    (SlugConfig(), dict(memory_budget="1GB", store="chunked")),
])
def test_a_setting_given_both_ways_is_refused_naming_it(config, keywords):
    model = Twin()
    original = params_of(model)
    losses = Counting()
    with pytest.raises(SlugError) as err:
        slug_fast.unlearn(model, [XF], [XR], lowered, forget_loss=losses.forget, retain_loss=losses.retain,
                          progress=False, config=config, **keywords)
    message = str(err.value)
    assert message.startswith(f"{', '.join(keywords)} given both as keyword(s) and by config=")
    change = ", ".join(f"{k}={v!r}" for k, v in keywords.items())
    assert message.endswith(f"config=dataclasses.replace(config, {change})")
    assert losses.calls == 0 and all(torch.equal(p.detach(), original[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("kw", [dict(memory_budget="1GB"), dict(config=SlugConfig(store="chunked", passes=2))])
def test_memory_settings_are_refused_on_several_processes_before_any_gradient(monkeypatch, kw):
    from types import SimpleNamespace

    monkeypatch.setattr(slug_fast.distributed, "resolve", lambda group: SimpleNamespace(rank=0, world=2))
    model, losses = Twin(), Counting()
    with pytest.raises(SlugError, match="memory_budget=, store= and passes= plan one process's gradients"):
        slug_fast.unlearn(model, [XF], [XR], lowered, forget_loss=losses.forget, retain_loss=losses.retain,
                          progress=False, **kw)
    assert losses.calls == 0


def test_config_must_be_a_slug_config():
    with pytest.raises(SlugError, match="config must be a slug_fast.SlugConfig, got dict"):
        run(config={"strategy": "deepest"})


def test_every_setting_is_a_keyword_showing_its_default():
    params = inspect.signature(slug_fast.unlearn).parameters
    fields = {f.name: f.default for f in dataclasses.fields(SlugConfig)}
    unset = {n for n, p in params.items() if type(p.default).__name__ == "Unset"}
    assert unset == set(fields)
    assert all(repr(params[n].default) == repr(default) for n, default in fields.items())
    assert fields["strategy"] == "best" and fields["max_evals"] == 10 and fields["store"] == "auto"


def test_slug_config_is_frozen_and_keeps_tower_lists_as_tuples():
    config = SlugConfig(tower=["vision", "text"])
    assert config.tower == ("vision", "text") and hash(config) == hash(SlugConfig(tower=("vision", "text")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_evals = 3
    assert dataclasses.replace(config, max_evals=3).max_evals == 3
    with pytest.raises(SlugError, match="max_evals must be a positive integer"):
        dataclasses.replace(config, max_evals=-1)


def test_criterion_not_reached_is_an_outcome_not_bad_input():
    assert not issubclass(CriterionNotReached, ValueError) and not issubclass(CriterionNotReached, SlugError)
    with pytest.raises(CriterionNotReached):
        try:
            run(criterion=lambda m: False, max_evals=1)
        except SlugError:  # must not take it
            pytest.fail("CriterionNotReached was caught as a SlugError")


# 2. DeltaConfig: the delta's config records the run and reads newer minor versions

PYPROJECT_VERSION = re.search(r'^version = "([^"]+)"', (Path(__file__).resolve().parents[1] / "pyproject.toml")
                              .read_text(), re.M).group(1)


def saved(tmp_path, **kw):
    model = Twin()
    res, _ = run(model, apply=False, **kw)
    return model, res, res.save(tmp_path / "delta")


def expected_after(model, res):
    """theta + delta by hand (float32, cast back), from the result's delta."""
    named = dict(model.named_parameters())
    return {n: (named[n].detach().float() + res.delta[n].float()).to(named[n].dtype) for n in res.delta}


def test_the_saved_config_records_the_runs_settings_and_round_trips(tmp_path):
    _, res, path = saved(tmp_path, config=SlugConfig(**CHOSEN))
    raw = json.loads((path / CONFIG_FILE).read_text())
    assert raw["version"] == "1.2" and raw["format"] == "slug_fast.delta"
    assert {k: raw[k] for k in ("strategy", "group", "cache", "max_evals", "memory_mode")} == dict(
        strategy="deepest", group=True, cache=False, max_evals=4, memory_mode="chunked")
    assert raw["slug_fast_version"] == PYPROJECT_VERSION == slug_fast.__version__
    assert raw["layers"] == res.edited and raw["step"] == res.step and raw["tower"] == "vision"
    config = DeltaConfig.from_dict(raw)
    assert config.strategy == "deepest" and config.max_evals == 4 and config.extra == {}
    assert config.to_dict() == raw
    assert slug_fast.load_delta(path)[1] == raw


def test_meta_without_a_field_is_kept_in_extra_without_warning(tmp_path):
    model = Twin()
    named = dict(model.named_parameters())
    delta = {"visual.0.weight": torch.full((6, 4), 0.25)}
    path = slug_fast.save_delta(tmp_path / "d", delta, {n: slug_fast.delta.tensor_spec(named[n]) for n in delta},
                                {"step": 0.5, "note": {"by": "me"}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw = slug_fast.load_delta(path)[1]
    config = DeltaConfig.from_dict(raw)
    assert config.extra == {"note": {"by": "me"}} and config.step == 0.5 and config.strategy is None
    assert config.to_dict() == raw


def with_config(path, edit):
    raw = json.loads((path / CONFIG_FILE).read_text())
    edit(raw)
    (path / CONFIG_FILE).write_text(json.dumps(raw))


def test_a_newer_minor_version_applies_with_a_warning_naming_the_unknown_keys(tmp_path):
    model, res, path = saved(tmp_path)
    name = res.edited[0]

    def newer(raw):
        raw.update(version="1.7", future_setting=[1, 2])
        raw["tensors"][name]["scale_hint"] = 2.0
    with_config(path, newer)
    target = Twin()
    expected = expected_after(target, res)
    with pytest.warns(UserWarning) as caught:
        assert slug_fast.apply_delta(target, path) == res.edited
    message = str(caught[0].message)
    assert "delta format 1.7, newer than the 1.2 this slug_fast" in message
    assert message.endswith("not used: future_setting, tensors[*].scale_hint")
    named = dict(target.named_parameters())
    assert all(torch.equal(named[n].detach(), expected[n]) for n in expected)
    with pytest.warns(UserWarning, match="not used: future_setting, tensors"):
        config = DeltaConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    assert config.version == "1.7" and config.extra == {"future_setting": [1, 2]}


def test_a_newer_minor_version_with_nothing_unknown_and_version_1_read_silently(tmp_path):
    _, res, path = saved(tmp_path)
    for version in ("1.4", 1, "1.0"):
        with_config(path, lambda raw: raw.update(version=version))
        target = Twin()
        expected = expected_after(target, res)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            slug_fast.apply_delta(target, path)
        named = dict(target.named_parameters())
        assert all(torch.equal(named[n].detach(), expected[n]) for n in expected)


@pytest.mark.parametrize("version, match", [
    ("2.0", r"has delta format version 2\.0, a newer major version than this slug_fast \(.+\) reads: 1\.x, up "
            r"to 1\.2; upgrade slug_fast to read it"),
    (2, r"has delta format version 2\.0, a newer major version"),
    ("0.9", r"has delta format version 0\.9, another major version than this slug_fast \(.+\) reads: 1\.x, up "
            r"to 1\.2$"),
    ("1.1.0", r"has version '1\.1\.0'; expected a delta format version such as '1\.2'"),
])
def test_another_major_version_is_refused_saying_which_and_what_is_read(tmp_path, version, match):
    _, _, path = saved(tmp_path)
    with_config(path, lambda raw: raw.update(version=version))
    target = Twin()
    original = params_of(target)
    with pytest.raises(DeltaError, match=match):
        slug_fast.apply_delta(target, path)
    assert all(torch.equal(p.detach(), original[n]) for n, p in target.named_parameters())
    with pytest.raises(DeltaError, match="^the delta config " + match.removeprefix("^")):
        DeltaConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
