"""README "Adding a model family", done exactly as written there: its file is read from README.md
and put where the README says (a module of slug_fast.adapters), its registry line is read and added
to FAMILIES; then a tiny model of the family is unlearned and its towers, groups and exclusions
are checked against rules written out by hand here."""
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import VisionTransformer

import slug_fast
import slug_fast.adapters as adapters

README = Path(__file__).resolve().parents[1] / "README.md"


def section_blocks() -> list[str]:
    """The ```python blocks of README's "### Adding a model family" section, in order."""
    text = README.read_text(encoding="utf-8")
    start = text.find("\n### Adding a model family\n")
    if start < 0:
        pytest.fail("README.md has no '### Adding a model family' section")
    end = re.search(r"\n##+ ", text[start + 1:])
    section = text[start:start + 1 + end.start()] if end else text[start:]
    return re.findall(r"```python\n(.*?)\n```", section, re.S)


@pytest.fixture
def family(tmp_path, monkeypatch):
    """The README's family added to slug_fast as the README says: (its module's name, its Family)."""
    file_block, line_block = section_blocks()
    path = re.match(r"# slug_fast/adapters/(\w+)\.py\n", file_block)
    assert path, "the file block starts with its path, # slug_fast/adapters/NAME.py"
    module = f"slug_fast.adapters.{path.group(1)}"
    (tmp_path / f"{path.group(1)}.py").write_text(file_block)
    monkeypatch.setattr(adapters, "__path__", [*adapters.__path__, str(tmp_path)])  # a file of the package
    code = [ln for ln in line_block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(code) == 1, "the registry block is one line"
    entry = eval(code[0].strip().rstrip(","), vars(adapters))  # as a list item of FAMILIES
    monkeypatch.setattr(adapters, "FAMILIES", [*adapters.FAMILIES, entry])
    yield module, entry
    sys.modules.pop(module, None)


def batches(gen, n, label):
    """Batches of (images, labels) whose class shows as a brighter channel."""
    out = []
    for _ in range(n):
        images = 0.5 * torch.randn(8, 3, 16, 16, generator=gen)
        images[:, label] += 1.0
        out.append((images, torch.full((8,), label)))
    return out


@pytest.fixture(scope="module")
def trained():
    """The state of a tiny torchvision ViT trained to tell the three classes apart (its head starts at 0)."""
    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=3)
    gen = torch.Generator().manual_seed(0)
    data = [b for label in range(3) for b in batches(gen, 2, label)]
    images, labels = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny_vit(state):
    model = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=3)
    model.load_state_dict(state)
    return model.eval()


def mlp_pairs(names):
    """Each block's (mlp.0.weight, mlp.3.weight), by hand."""
    blocks = sorted({n.split(".mlp.")[0] for n in names if ".mlp." in n})
    return [[f"{b}.mlp.0.weight", f"{b}.mlp.3.weight"] for b in blocks]


def test_the_readme_family_is_detected_and_its_towers_groups_and_exclusions_are_used(family, trained, gen):
    module, entry = family
    model = tiny_vit(trained)
    assert slug_fast.adapters.get_adapter(model).name == entry.name  # picked from the model's type
    assert type(slug_fast.adapters.get_adapter(model)).__module__ == module
    forget = batches(gen, 2, 0)
    retain = batches(gen, 2, 1) + batches(gen, 2, 2)

    def forget_ce(m):
        with torch.no_grad():
            return sum(F.cross_entropy(m(x), y).item() for x, y in forget)

    before = forget_ce(model)

    def criterion(m):
        return forget_ce(m) > before + 0.05

    result = slug_fast.unlearn(model, forget, retain, criterion, apply=False, progress=False)
    assert result.backends["adapter"] == entry.name
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    # eligible by hand: >= 2 dims, no bias / norm / embedding word, and not the class token (the family's)
    eligible = [n for n, s in shapes.items() if len(s) >= 2 and n not in ("class_token", "encoder.pos_embedding")]
    assert "class_token" in shapes and len(shapes["class_token"]) == 3
    assert sorted(result.stats.names) == sorted(eligible)
    assert {t: sorted(m) for t, m in result.tower_members.items()} == {
        "body": sorted(n for n in eligible if not n.startswith("heads.")), "head": ["heads.head.weight"]}

    # a run whose fronts can only hold MLP layers: each candidate is a block's mlp.0 and mlp.3 together
    pairs = mlp_pairs(shapes)
    assert len(pairs) == 2
    mlp = [n for pair in pairs for n in pair]
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = slug_fast.unlearn(model, forget, retain, criterion, params=mlp, tower="body", progress=False)
    assert result.candidates and all(c.layers in pairs for c in result.candidates)
    assert result.layers in pairs
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), original[n])]
    assert changed == result.layers and forget_ce(model) > before + 0.05
    # with group=False the same run moves single tensors
    alone = slug_fast.unlearn(tiny_vit(trained), forget, retain, criterion, params=mlp, tower="body", group=False,
                              apply=False, progress=False)
    assert all(len(c.layers) == 1 for c in alone.candidates)


def test_without_its_registry_line_the_family_is_unknown(family, trained, monkeypatch):
    _, entry = family
    monkeypatch.setattr(adapters, "FAMILIES", [f for f in adapters.FAMILIES if f is not entry])
    with pytest.raises(slug_fast.SlugError, match="unknown model type torchvision.models.vision_transformer"):
        slug_fast.adapters.get_adapter(tiny_vit(trained))
