"""The README's model examples, run verbatim on tiny models built offline.

Each adapter section of README.md ("Models: one adapter per family") has a load block that
needs the hub, then a block marked `<!-- example: NAME -->` that uses the names the load
block defines. Here each marked block is read from README.md at test time and exec'd in a
namespace holding offline stand-ins for exactly those names (plus slug_fast and torch), in
a temporary working directory; then the outcome the example promises is checked against
facts computed independently of the library (plain model calls, parameter snapshots).
"""
import ast
import json
import re
import string
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import slug_fast

README = Path(__file__).resolve().parents[1] / "README.md"
PYTHON_BLOCK = r"```python\n(.*?)\n```"


def readme_example(name: str) -> tuple[str, str]:
    """(load block, example block) of README section NAME: the ```python block marked
    `<!-- example: NAME -->`, and the last ```python block before that marker."""
    text = README.read_text(encoding="utf-8")
    marked = re.search(r"<!--\s*example:\s*" + re.escape(name) + r"\s*-->\s*\n" + PYTHON_BLOCK, text, re.S)
    if marked is None:
        pytest.fail(f"README.md has no ```python block right after '<!-- example: {name} -->'; "
                    f"tests/test_readme.py runs that block verbatim")
    loads = re.findall(PYTHON_BLOCK, text[:marked.start()], re.S)
    if not loads:
        pytest.fail(f"README.md has no ```python load block before '<!-- example: {name} -->'")
    return loads[-1], marked.group(1)


def bound_names(source: str) -> set[str]:
    """Names a block binds by assignment at top level (imports left out)."""
    names = set()
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if target is not None:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names - {"_"}


def run_example(name: str, standins: dict) -> dict:
    """exec the README's NAME example verbatim with `standins` for the names its load block binds."""
    load, example = readme_example(name)
    assert bound_names(load) == set(standins), (
        f"README load block of {name!r} binds {sorted(bound_names(load))}; the test's stand-ins are "
        f"{sorted(standins)}")
    namespace = {"__name__": f"readme_example_{name}", "slug_fast": slug_fast, "torch": torch, **standins}
    exec(compile(example, f"README.md <!-- example: {name} -->", "exec"), namespace)
    return namespace


def params(module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a module, cloned."""
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


def changed(before: dict, module) -> list[str]:
    """Names of the parameters and buffers that are no longer bit-identical to `before`."""
    after = module.state_dict()
    assert before.keys() == after.keys()
    return sorted(n for n in before if not torch.equal(before[n], after[n]))


def assert_one_layer_or_group(names: list[str]):
    """One tensor, or the q/k/v_proj or fc1/fc2 group of one Hugging Face block (README: they move together)."""
    assert names
    if len(names) == 1:
        return
    prefixes = {n.rsplit(".", 2)[0] for n in names}
    kinds = sorted(n.rsplit(".", 2)[1] for n in names)
    assert len(prefixes) == 1 and all(n.endswith(".weight") for n in names), names
    assert kinds in (["k_proj", "q_proj", "v_proj"], ["fc1", "fc2"]), names


@torch.no_grad()
def zero_shot_similarities(image_emb, text_emb_of, class_names, templates):
    """(N, C) cosines of images to classes from plain embeddings: class weight = renormalised mean of
    the normalised template embeddings (CLIP's zero-shot recipe)."""
    texts = [t.format(c) for c in class_names for t in templates]
    weights = F.normalize(text_emb_of(texts), dim=-1).view(len(class_names), len(templates), -1).mean(1)
    return F.normalize(image_emb, dim=-1) @ F.normalize(weights, dim=-1).T


def concept_facts(sims, labels, concept_index, k):
    """(fraction of the concept's images with it among their top k, the other images' top-1 accuracy)."""
    labels = torch.as_tensor(labels)
    own = sims.gather(1, labels[:, None])
    rank = (sims > own).sum(1)  # 0 = best
    mine = labels == concept_index
    return (rank[mine] < k).float().mean().item(), (rank[~mine] == 0).float().mean().item()


def digit_pairs(data, count, seed=0):
    """(PIL digit image, caption) pairs over the first `count` training images, and their labels."""
    from slug_fast import digits

    labels = data.train_labels[:count]
    captions = digits.captions_for(labels, torch.Generator().manual_seed(seed))
    return [(digits.to_pil(data.train_images[i], data), captions[i]) for i in range(count)], labels


# ------------------------------------------------------------------------------------------ open_clip

@pytest.fixture
def open_clip_dir(tmp_path, digits_trained):
    """The trained digits mini-CLIP saved as an open_clip "local-dir" model (config + safetensors)."""
    from safetensors.torch import save_file

    from slug_fast import digits

    state, data = digits_trained
    root = tmp_path / "hub" / "digits-clip"
    root.mkdir(parents=True)
    (root / "open_clip_config.json").write_text(json.dumps(digits.open_clip_config(data)))
    save_file({k: v.contiguous() for k, v in state.items()}, root / "open_clip_model.safetensors")
    return root


def open_clip_standins(open_clip_dir, data, tmp_path, monkeypatch):
    """The open_clip examples' names: the saved mini-CLIP through open_clip's own loaders and 300
    captioned digits; also their labels. The working directory becomes an empty folder."""
    import open_clip

    from slug_fast import digits
    from slug_fast.data import pairs_from

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{open_clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{open_clip_dir}")
    items, labels = digit_pairs(data, 300)
    standins = dict(model=model.eval(), preprocess=preprocess, tokenizer=tokenizer, pairs=pairs_from(items),
                    concept="seven", class_names=list(digits.DIGIT_NAMES), k=5)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return standins, items, labels


def test_open_clip_example(open_clip_dir, digits_trained, tmp_path, monkeypatch, capsys):
    import open_clip

    from slug_fast.eval.zero_shot import IDENTITY_TEMPLATES

    state, data = digits_trained
    standins, items, labels = open_clip_standins(open_clip_dir, data, tmp_path, monkeypatch)
    model, preprocess, tokenizer = standins["model"], standins["preprocess"], standins["tokenizer"]
    concept, class_names, k = standins["concept"], standins["class_names"], standins["k"]
    assert all(torch.equal(p, state[n]) for n, p in model.state_dict().items())  # the trained weights loaded
    pixels = torch.stack([preprocess(im) for im, _ in items])

    def facts(m):
        with torch.no_grad():
            sims = zero_shot_similarities(m.encode_image(pixels), lambda t: m.encode_text(tokenizer(t)),
                                          class_names, IDENTITY_TEMPLATES)
        return concept_facts(sims, labels, class_names.index(concept), k)

    known, others0 = facts(model)
    assert known > 0.9 and others0 > 0.5  # the concept and the other digits are known before
    before = params(model)

    ns = run_example("open_clip", standins)

    result = ns["result"]
    assert changed(before, model) == sorted(result.edited) and len(result.edited) == 1  # one layer, in place
    known, others = facts(model)
    assert known == 0.0  # forget top-k is 0: no seven has "seven" among its k best classes
    assert others > 0.5 and others >= others0 - 0.25, (others0, others)  # others_top1 kept (well above chance)
    forgotten, metrics = ns["criterion"](model)
    assert forgotten and metrics["forget_top1"] == metrics[f"forget_top{k}"] == 0.0
    assert str(result.edited) in capsys.readouterr().out

    fresh, _, _ = open_clip.create_model_and_transforms(f"local-dir:{open_clip_dir}")
    assert slug_fast.apply_delta(fresh, tmp_path / "work" / "unlearned_delta") == result.edited
    edited = dict(model.named_parameters())
    assert all(torch.equal(p.detach(), edited[n].detach()) for n, p in fresh.named_parameters())


# ------------------------------------------------------------------------ Hugging Face CLIP and SD

CLIP_LEN, HF_STEPS = 32, 250


@pytest.fixture(scope="module")
def hf_clip_trained(tmp_path_factory, digits_trained):
    """A tiny transformers CLIP trained contrastively on the 8x8 digits for a few seconds, with a real
    CLIPProcessor (CLIPImageProcessor + a letter-level CLIPTokenizer written to files)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from slug_fast import digits
    from slug_fast.eval.zero_shot import IDENTITY_TEMPLATES

    _, data = digits_trained
    root = tmp_path_factory.mktemp("clip_tokenizer")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + ".-":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=CLIP_LEN)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 8},
                                                                 crop_size={"height": 8, "width": 8}),
                              tokenizer=tok)
    # hidden size 32: the tiny Stable Diffusion UNet of test_adapter_stable_diffusion cross-attends to it
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=CLIP_LEN, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=8,
                  patch_size=4)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config)

    pixels = processor(images=[digits.to_pil(im, data) for im in data.train_images],
                       return_tensors="pt")["pixel_values"]
    templates = list(digits.TEMPLATES) + list(IDENTITY_TEMPLATES)
    captions = tok([t.format(n) for n in digits.DIGIT_NAMES for t in templates], padding=True, return_tensors="pt")
    labels, gen = data.train_labels, torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(HF_STEPS):
        idx = torch.randint(len(labels), (64,), generator=gen)
        key = labels[idx] * len(templates) + torch.randint(len(templates), (64,), generator=gen)
        uniq, inv = key.unique(return_inverse=True)  # each distinct caption encoded once
        txt = model.get_text_features(input_ids=captions["input_ids"][uniq],
                                      attention_mask=captions["attention_mask"][uniq]).pooler_output[inv]
        img = model.get_image_features(pixel_values=pixels[idx]).pooler_output
        loss = digits._clip_loss(img, txt, labels[idx], model.logit_scale.exp())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"config": config, "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "processor": processor, "data": data}


def trained_hf_clip(trained):
    from transformers import CLIPModel

    model = CLIPModel(trained["config"])
    model.load_state_dict(trained["state"])
    return model.eval()


def hf_facts(clip, processor, items, labels, class_names, concept, k):
    """concept_facts of a transformers CLIP, from its own get_*_features and the processor."""
    from slug_fast.eval.zero_shot import IDENTITY_TEMPLATES

    def text_emb(texts):
        return clip.get_text_features(**processor.tokenizer(texts, padding=True, return_tensors="pt")).pooler_output

    with torch.no_grad():
        pixels = processor(images=[im for im, _ in items], return_tensors="pt")["pixel_values"]
        sims = zero_shot_similarities(clip.get_image_features(pixel_values=pixels).pooler_output, text_emb,
                                      class_names, IDENTITY_TEMPLATES)
    return concept_facts(sims, labels, class_names.index(concept), k)


def test_hf_clip_example(hf_clip_trained, tmp_path, monkeypatch, capsys):
    from slug_fast import digits
    from slug_fast.data import pairs_from

    model, processor = trained_hf_clip(hf_clip_trained), hf_clip_trained["processor"]
    items, labels = digit_pairs(hf_clip_trained["data"], 300)
    concept, class_names, k = "seven", list(digits.DIGIT_NAMES), 5
    known, others0 = hf_facts(model, processor, items, labels, class_names, concept, k)
    assert known > 0.9 and others0 > 0.5  # the concept and the other digits are known before
    before = params(model)
    monkeypatch.chdir(tmp_path)

    ns = run_example("hf_clip", dict(model=model, processor=processor, pairs=pairs_from(items), concept=concept,
                                     class_names=class_names, k=k))

    result = ns["result"]
    assert result.backends["adapter"] == "hf_clip"
    assert changed(before, model) == sorted(result.edited)  # in place, nothing else
    assert_one_layer_or_group(result.edited)
    for candidate in result.candidates:  # every layer searched moved with its q/k/v or fc1/fc2 group
        assert_one_layer_or_group(candidate.layers)
        assert len(candidate.layers) > 1 or not re.search(r"\.(q_proj|k_proj|v_proj|fc1|fc2)\.", candidate.layers[0])
    known, others = hf_facts(model, processor, items, labels, class_names, concept, k)
    assert known == 0.0  # forget top-k is 0
    assert others > 0.5, (others0, others)
    assert str(result.edited) in capsys.readouterr().out


def test_stable_diffusion_example(hf_clip_trained, tmp_path, monkeypatch, capsys):
    from test_adapter_stable_diffusion import encoder_from, make_pipe, snapshot
    from test_adapter_stable_diffusion import changed as changed_tensors

    from slug_fast import digits
    from slug_fast.data import pairs_from

    clip, processor = trained_hf_clip(hf_clip_trained), hf_clip_trained["processor"]
    pipe = make_pipe(processor.tokenizer, encoder_from(clip))
    items, labels = digit_pairs(hf_clip_trained["data"], 300)
    concept, class_names, k, steps = "seven", list(digits.DIGIT_NAMES), 5, 2
    known, _ = hf_facts(clip, processor, items, labels, class_names, concept, k)
    assert known > 0.9
    pipe_before, clip_before = snapshot(pipe), snapshot(clip)
    monkeypatch.chdir(tmp_path)

    ns = run_example("stable_diffusion", dict(pipe=pipe, clip=clip, processor=processor, pairs=pairs_from(items),
                                              concept=concept, class_names=class_names, k=k, steps=steps))

    result = ns["result"]
    assert result.backends["adapter"] == "stable_diffusion"
    pipe_after, clip_after = snapshot(pipe), snapshot(clip)
    # exactly the text-encoder tensors the result names changed, in every component of the pipeline
    assert sorted(changed_tensors(pipe_before, pipe_after)) == sorted(result.edited)
    assert all(n.startswith("text_encoder.") for n in result.edited)
    assert_one_layer_or_group(result.edited)
    # and the CLIP model's text tower moved identically
    clip_names = sorted("text_model." + n.removeprefix("text_encoder.") for n in result.edited)
    assert sorted(changed_tensors(clip_before, clip_after)) == clip_names == sorted(result.layers)
    assert all(torch.equal(clip_after["text_model." + n.removeprefix("text_encoder.")], pipe_after[n])
               for n in result.edited)
    known, _ = hf_facts(clip, processor, items, labels, class_names, concept, k)
    assert known == 0.0  # forget top-k is 0 through the edited text tower

    scores = ns["scores"]
    images = scores["images"]
    assert images.shape == (1, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    with torch.no_grad():  # the scores are CLIP's own zero-shot probabilities of the generated image
        pil = pipe.numpy_to_pil(images.permute(0, 2, 3, 1).numpy())
        text = processor.tokenizer([f"a photo of a {c}." for c in class_names], padding=True, return_tensors="pt")
        expected = clip(pixel_values=processor(images=pil, return_tensors="pt")["pixel_values"],
                        **text).logits_per_image.softmax(-1)
    assert scores["probabilities"].shape == (1, len(class_names))
    assert torch.allclose(scores["probabilities"], expected, atol=1e-5)
    assert scores["predicted"] == [class_names[int(expected.argmax())]]
    assert scores["accuracy"] == (100.0 if scores["predicted"] == [concept] else 0.0)
    out = capsys.readouterr().out
    assert str(result.edited) in out and f"{scores['predicted']} {scores['accuracy']}" in out


# ------------------------------------------------------------------------------------------- LLaVA

LLAVA_PROMPT = "USER: <image>\n{question} ASSISTANT:"  # LLaVA-1.5's conversation format


def pil_items(items):
    """(PIL image, question, answer) from test_adapter_llava's tensor pictures (patterns saturate to white)."""
    from PIL import Image

    def pil(x):
        return Image.fromarray(((x * 0.25 + 0.5).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())

    return [(pil(x), q, a) for x, q, a in items]


@pytest.fixture(scope="module")
def llava_trained():
    """A tiny LLaVA trained (transformers' own loss, inputs from a LlavaProcessor) to name "alice" and
    "bob" and tell colors, with that processor and PIL (image, question, answer) items."""
    from test_adapter_llava import IMAGE, PATCH, make_tokenizer, qa_items, tiny_llava
    from transformers import CLIPImageProcessor, LlavaProcessor

    from slug_fast.adapters.llava import LlavaAdapter

    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=make_tokenizer(), patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    forget, retain = (pil_items(items) for items in qa_items())
    model = tiny_llava()
    (batch,) = LlavaAdapter(model, processor=processor).make_qa_batches(forget + retain, batch_size=64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(50):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"state": {k: v.detach().clone() for k, v in model.eval().state_dict().items()}, "processor": processor,
            "forget": forget, "retain": retain}


@torch.no_grad()
def llava_answers(model, processor, items, max_new_tokens=8):
    """Greedy answers from transformers' own generate on the processor's inputs, one item at a time."""
    answers = []
    for image, question, _ in items:
        enc = processor(text=[LLAVA_PROMPT.format(question=question)], images=[image], return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
        answers.append(processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def rate(answers, items) -> float:
    """Fraction of answers holding the expected answer as a whole word."""
    hits = [re.search(rf"\b{re.escape(expected)}\b", text, re.I) for text, (_, _, expected) in zip(answers, items)]
    return sum(h is not None for h in hits) / len(items)


def test_llava_example(llava_trained, tmp_path, monkeypatch, capsys):
    from test_adapter_llava import TOWER, UNUSED, trained_llava

    model, processor = trained_llava(llava_trained["state"]), llava_trained["processor"]
    forget_items, retain_items = llava_trained["forget"], llava_trained["retain"]
    assert rate(llava_answers(model, processor, forget_items), forget_items) == 1.0  # names the concept before
    retain0 = rate(llava_answers(model, processor, retain_items), retain_items)
    assert retain0 >= 0.9
    before = params(model)
    monkeypatch.chdir(tmp_path)

    ns = run_example("llava", dict(model=model, processor=processor, forget_items=forget_items,
                                   retain_items=retain_items))

    result = ns["result"]
    assert result.backends["adapter"] == "llava"
    edited = changed(before, model)
    # one vision-tower tensor, or its q/k/v_proj or fc1/fc2 group (the adapter groups them, as the README says)
    assert edited == sorted(result.edited)
    assert_one_layer_or_group(edited)
    assert all(n.startswith(TOWER) and not n.startswith(UNUSED) for n in edited), edited
    after = llava_answers(model, processor, forget_items)
    assert rate(after, forget_items) == 0.0, after  # the forget answer rate is 0
    assert rate(llava_answers(model, processor, retain_items), retain_items) >= retain0 - 0.25
    assert str(result.edited) in capsys.readouterr().out


def test_big_models_example(open_clip_dir, digits_trained, tmp_path, monkeypatch, capsys):
    """The memory-budget example: the same edit as without a budget, and the plan reported."""
    import open_clip

    standins, _, _ = open_clip_standins(open_clip_dir, digits_trained[1], tmp_path, monkeypatch)
    ns = run_example("big-models", standins)
    result = ns["result"]
    memory = result.memory.to_dict()
    assert memory["budget_bytes"] == 3 * 10**9 and memory["checkpointing"]
    assert memory["mode"] == "full" and memory["predicted_peak_bytes"] <= memory["budget_bytes"]  # a tiny model
    assert f"{memory['mode']} {memory['passes']}" in capsys.readouterr().out

    fresh, _, _ = open_clip.create_model_and_transforms(f"local-dir:{open_clip_dir}")
    adapter = slug_fast.adapters.get_adapter(fresh.eval(), tokenizer=standins["tokenizer"],
                                             preprocess=standins["preprocess"])
    plain = slug_fast.unlearn(adapter, adapter.make_batches(ns["forget"], 8), adapter.make_batches(ns["retain"], 8),
                              ns["criterion"], apply=False, progress=False)
    assert plain.edited == result.edited and plain.step == result.step
