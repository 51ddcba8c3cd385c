"""Adapter detection and the registry, each family's towers and groups, the CLIP-family losses
against library oracles, and HF CLIP end to end."""
import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import slug_fast
from slug_fast.adapters import FAMILIES, Adapter, GenericAdapter, detect_adapter, get_adapter
from slug_fast.adapters.hf_clip import HFClipAdapter
from slug_fast.adapters.llava import LlavaAdapter
from slug_fast.adapters.open_clip import OpenClipAdapter
from slug_fast.adapters.stable_diffusion import StableDiffusionAdapter
from slug_fast.errors import SlugError
from slug_fast.loading import load_model
from slug_fast.pareto import split_towers

WORDS = "a photo of the digit zero one two three four five six seven eight nine cat dog car".split()


def word_tokenizer():
    """A tiny offline word-level tokenizer with CLIP-style [BOS] ... [EOS] framing."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]",
                                                      special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")


def tiny_hf_clip(seed=0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=len(WORDS) + 4, max_position_embeddings=16, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4),
        projection_dim=16)
    return CLIPModel(cfg).eval()


def random_pairs(n, gen, captions):
    images = torch.randn(n, 3, 16, 16, generator=gen)
    return [(images[i], captions[i % len(captions)]) for i in range(n)]


def test_detection_by_type(digits_model):
    assert detect_adapter(digits_model) == "open_clip"
    assert isinstance(get_adapter(digits_model), OpenClipAdapter)
    assert detect_adapter(tiny_hf_clip()) == "hf_clip"
    assert detect_adapter(torch.nn.Linear(2, 2)) is None
    with pytest.raises(SlugError, match="unknown model type torch.nn.modules.linear.Linear; pass adapter="):
        get_adapter(torch.nn.Linear(2, 2))
    with pytest.raises(SlugError, match="unknown adapter 'keras'"):
        get_adapter(digits_model, "keras")
    with pytest.raises(SlugError, match="has no forget loss: pass forget_loss="):
        GenericAdapter(torch.nn.Linear(2, 2)).forget_loss(None, None)


def test_open_clip_losses_match_open_clip_and_torch(digits_model, gen):
    import open_clip
    from slug_fast import digits

    ad = get_adapter(digits_model)
    labels = torch.arange(10)
    batch = (torch.randn(10, 3, 8, 8, generator=gen), digits.tokenize(digits.captions_for(labels, gen)))
    with torch.no_grad():
        img = digits_model.encode_image(batch[0], normalize=True)
        txt = digits_model.encode_text(batch[1], normalize=True)
        expected_retain = open_clip.loss.ClipLoss()(img, txt, digits_model.logit_scale.exp())
        expected_forget = torch.nn.CosineEmbeddingLoss()(img, txt, torch.ones(10))
        assert ad.retain_loss(digits_model, batch).item() == pytest.approx(expected_retain.item(), rel=1e-5)
        assert ad.forget_loss(digits_model, batch).item() == pytest.approx(expected_forget.item(), rel=1e-5)


def test_open_clip_batches_from_pil_images_use_the_preprocess(digits_model):
    import torchvision.transforms as T

    preprocess = T.Compose([T.Resize(8), T.ToTensor(), T.Lambda(lambda x: x * 2 - 1)])
    ad = get_adapter(digits_model, preprocess=preprocess)
    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(5)]
    batches = ad.make_batches([(im, "the digit seven") for im in pil], batch_size=2)
    assert [len(b[0]) for b in batches] == [2, 2, 1]
    assert torch.equal(batches[0][0][1], preprocess(pil[1]))
    assert batches[0][1].shape == (2, 16)
    with pytest.raises(SlugError, match="PIL images need the model's preprocessing"):
        get_adapter(digits_model).make_batches([(pil[0], "x")])


def test_hf_clip_losses_match_transformers():
    model, tok = tiny_hf_clip(), word_tokenizer()
    ad = HFClipAdapter(model, tokenizer=tok)
    gen = torch.Generator().manual_seed(1)
    batch = ad.make_batches(random_pairs(6, gen, ["a photo of the cat", "a dog", "the car", "seven", "a digit",
                                                  "two dog"]), 6)[0]
    with torch.no_grad():
        out = model(**batch, return_loss=True)
        assert ad.retain_loss(model, batch).item() == pytest.approx(out.loss.item(), rel=1e-5)
        cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
        assert ad.forget_loss(model, batch).item() == pytest.approx((1 - cos).mean().item(), rel=1e-5)


def test_hf_clip_unlearn_moves_a_qkv_or_fc_group_and_round_trips(tmp_path):
    model, tok = tiny_hf_clip(), word_tokenizer()
    ad = HFClipAdapter(model, tokenizer=tok)
    gen = torch.Generator().manual_seed(2)
    forget = ad.make_batches(random_pairs(16, gen, ["a photo of the cat"]), 8)
    retain = ad.make_batches(random_pairs(32, gen, ["a dog", "the car", "a photo of the digit seven",
                                                    "two", "a photo of a dog"]), 16)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_f0 = sum(ad.forget_loss(model, b).item() for b in forget)
    loss_r0 = sum(ad.retain_loss(model, b).item() for b in retain)

    def criterion(m):
        with torch.no_grad():
            value = sum(ad.forget_loss(m, b).item() for b in forget)
        return value > loss_f0 + 0.2, {"forget_loss": value}

    result = slug_fast.unlearn(model, forget, retain, criterion, tokenizer=tok, progress=False)
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p.detach(), original[n]))
    assert changed == sorted(result.layers)
    layer = result.layers[0]
    if "_proj.weight" in layer and "out_proj" not in layer:
        assert len(changed) == 3 and {n.rsplit(".", 2)[-2] for n in changed} == {"q_proj", "k_proj", "v_proj"}
    elif ".fc" in layer:
        assert len(changed) == 2 and {n.rsplit(".", 2)[-2] for n in changed} == {"fc1", "fc2"}
    else:
        assert len(changed) == 1
    assert result.to_dict()["backends"]["adapter"] == "hf_clip"
    loss_f1 = sum(ad.forget_loss(model, b).item() for b in forget)
    loss_r1 = sum(ad.retain_loss(model, b).item() for b in retain)
    assert loss_f1 > loss_f0 + 0.2
    assert abs(loss_r1 - loss_r0) < abs(loss_f1 - loss_f0)

    fresh = tiny_hf_clip()
    slug_fast.apply_delta(fresh, result.save(tmp_path / "d"))
    assert all(torch.equal(p.detach(), dict(model.named_parameters())[n].detach())
               for n, p in fresh.named_parameters())


def test_generic_adapter_with_user_losses():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    xf, xr = torch.randn(16, 4), torch.randn(64, 4)

    def forget_loss(m, x):
        return -m(x)[:, 0].mean()  # ascending it lowers output 0 on the forget inputs

    def retain_loss(m, x):
        return m(x).pow(2).mean()

    with torch.no_grad():
        before = net(xf)[:, 0].mean().item()
    result = slug_fast.unlearn(net, [xf], [xr], lambda m: m(xf)[:, 0].mean().item() < before - 0.5,
                               forget_loss=forget_loss, retain_loss=retain_loss, progress=False)
    with torch.no_grad():
        assert net(xf)[:, 0].mean().item() < before - 0.5
    assert result.to_dict()["backends"]["adapter"] == "generic" and len(result.layers) == 1


def hf_groups_by_hand(name: str, names) -> list[str]:
    """q/k/v_proj weights of a block together, fc1/fc2 weights together, else alone (string surgery)."""
    head, _, leaf = name.rpartition(".")
    block, _, kind = head.rpartition(".")
    families = (["q_proj", "k_proj", "v_proj"], ["fc1", "fc2"])
    members = next((f for f in families if kind in f), None) if leaf == "weight" else None
    return [n for n in (f"{block}.{m}.weight" for m in members) if n in names] if members else [name]


def test_each_family_declares_its_towers_and_groups(digits_model):
    ad = get_adapter(digits_model)
    names = [n for n, p in digits_model.named_parameters() if ad.eligible(n, tuple(p.shape))]
    towers = split_towers(names, ad.tower_rules(names))
    assert towers == {"vision": [n for n in names if n.startswith("visual.")],
                      "text": [n for n in names if not n.startswith("visual.")]}
    assert all(ad.group_of(n, names) == [n] for n in names)  # open_clip: every layer alone

    hf = HFClipAdapter(tiny_hf_clip())
    names = [n for n, p in hf.target.named_parameters() if hf.eligible(n, tuple(p.shape))]
    towers = split_towers(names, hf.tower_rules(names))
    assert towers == {"vision": [n for n in names if n.startswith(("vision_model.", "visual_projection."))],
                      "text": [n for n in names if n.startswith(("text_model.", "text_projection."))]}
    assert sum(map(len, towers.values())) == len(names)
    groups = {n: hf.group_of(n, names) for n in names}
    assert groups == {n: hf_groups_by_hand(n, names) for n in names}
    assert sum(len(g) == 3 for g in groups.values()) == 3 * 4 and sum(len(g) == 2 for g in groups.values()) == 2 * 4
    q = next(n for n in names if n.endswith("q_proj.weight"))
    partial = [n for n in names if not n.endswith("k_proj.weight")]
    assert hf.group_of(q, partial) == [q, q.replace("q_proj", "v_proj")]  # only the members present
    # the Stable Diffusion and LLaVA adapters edit transformers CLIP towers: the same groups
    assert StableDiffusionAdapter.group_of is HFClipAdapter.group_of is LlavaAdapter.group_of
    assert Adapter(torch.nn.Linear(2, 2)).group_of(q, names) == [q]


def test_generic_adapter_towers_from_the_names_or_one_tower(digits_model):
    def towers_of(model, **options):
        ad = GenericAdapter(model, **options)
        names = [n for n, p in model.named_parameters() if ad.eligible(n, tuple(p.shape))]
        return split_towers(names, ad.tower_rules(names))

    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    assert towers_of(plain) == {"model": ["0.weight", "1.weight"]}
    assert towers_of(plain, towers={"first": "0.", "last": "1."}) == {"first": ["0.weight"], "last": ["1.weight"]}
    # names of a CLIP family (checked by hand above): that family's towers
    assert towers_of(digits_model) == split_towers(list(towers_of(digits_model, towers={"all": ""})["all"]),
                                                   OpenClipAdapter.towers)
    hf = tiny_hf_clip()
    assert towers_of(hf) == split_towers(towers_of(hf, towers={"all": ""})["all"], HFClipAdapter.towers)
    with pytest.raises(SlugError, match="the generic adapter has no tower 'vision'; towers: \\['model'\\]"):
        GenericAdapter(plain).tower_params("vision")
    assert GenericAdapter(plain).tower_params("model") == list(plain.parameters())


def test_the_registry_names_detects_and_builds_every_family(digits_model):
    assert [f.name for f in FAMILIES] == ["generic", "open_clip", "hf_clip", "stable_diffusion", "llava"]
    assert all(f.adapter_class().name == f.name for f in FAMILIES)
    assert isinstance(get_adapter(digits_model, "generic"), GenericAdapter)
    assert isinstance(get_adapter(tiny_hf_clip(), "hf_clip", tokenizer=word_tokenizer()), HFClipAdapter)
    with pytest.raises(SlugError, match=r"unknown adapter 'keras'; choose one of \['generic', 'hf_clip', 'llava', "
                                        r"'open_clip', 'stable_diffusion'\]"):
        get_adapter(digits_model, "keras")

    hf = tiny_hf_clip()

    class Wrapped(type(hf)):  # a subclass of a family's model class is that family's too
        pass
    assert detect_adapter(Wrapped(hf.config)) == "hf_clip"


def test_load_model_reads_a_hugging_face_directory_through_the_registry(tmp_path):
    from transformers import CLIPImageProcessor

    model, tok = tiny_hf_clip(seed=3), word_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(tmp_path / "m")
    ad = load_model(str(tmp_path / "m"))
    assert isinstance(ad, HFClipAdapter) and ad.source == {"library": "transformers", "name": str(tmp_path / "m")}
    loaded = dict(ad.model.named_parameters())
    assert all(torch.equal(p, loaded[n]) for n, p in model.named_parameters())
    assert torch.equal(ad.tokens(["a photo of the cat"])["input_ids"], tok(["a photo of the cat"],
                                                                            return_tensors="pt")["input_ids"])
    with pytest.raises(SlugError, match=r"could not load '.*missing' as a hf_clip model"):
        load_model(str(tmp_path / "missing"))


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the slug_fast modules a source file imports, lazy imports included."""
    package = "slug_fast." + ".".join(path.relative_to(Path(slug_fast.__file__).parent).parent.parts)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rstrip(".").split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            out |= {module} | {f"{module}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("slug_fast")}


def test_no_module_imports_a_layer_above_it():
    root = Path(slug_fast.__file__).parent
    for path in (root / "adapters").glob("*.py"):
        assert not {m for m in imported_modules(path) if m.startswith("slug_fast.eval")}, path.name
    for name in ("pareto.py", "parameters.py", "delta.py", "modes.py"):
        assert not {m for m in imported_modules(root / name) if m.startswith("slug_fast.adapters")}, name
    assert "slug_fast.adapters.base" in imported_modules(root / "adapters" / "llava.py")  # the parser resolves
    assert "slug_fast.modes.training_state" in imported_modules(root / "eval" / "zero_shot.py")
