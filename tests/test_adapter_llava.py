"""LLaVA adapter on a tiny LlavaForConditionalGeneration built offline: input layout, the
vision tower lookup, SLUG with the VLM's own loss (mode="vlm") and through a matching CLIP
model whose edits are mirrored into the LLaVA tower (mode="clip")."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModel,
                          LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                          PreTrainedTokenizerFast)

import slug_fast
from slug_fast.adapters import get_adapter
from slug_fast.adapters.hf_clip import HFClipAdapter
from slug_fast.adapters.llava import LlavaAdapter, answer_loss, match_vision_towers, vision_tower_of
from slug_fast.data import split_by_concept
from slug_fast.errors import SlugError
from slug_fast.eval import answer_rate, generate_answers, mentions
from slug_fast.pareto import is_eligible

from trained_models import trained_once

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:", "who", "is", "this", "?", "what",
         "color", "alice", "bob", "red", "green", "blue", "a", "photo", "of"]
ID = {w: i for i, w in enumerate(WORDS)}
IMAGE, PATCH, VISION_LAYERS = 16, 4, 3
N_PATCHES = (IMAGE // PATCH) ** 2
WHO, COLOR = "who is this ?", "what color is this ?"
TOWER = "model.vision_tower."
# vision_feature_layer=-2 reads the output of layer 1: layer 2 and post_layernorm never reach the LM
UNUSED = (f"{TOWER}encoder.layers.2.", f"{TOWER}post_layernorm.")


def make_tokenizer():
    tk = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def vision_config():
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=VISION_LAYERS,
                            num_attention_heads=2, image_size=IMAGE, patch_size=PATCH, projection_dim=16)


def tiny_llava(seed=0, strategy="default"):
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=len(WORDS), max_position_embeddings=128,
                       pad_token_id=ID["<pad>"], bos_token_id=ID["<s>"], eos_token_id=ID["</s>"])
    cfg = LlavaConfig(vision_config=vision_config(), text_config=text, image_token_index=ID["<image>"],
                      vision_feature_select_strategy=strategy, vision_feature_layer=-2)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg).eval()


def tiny_clip(seed=1):
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=len(WORDS), max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(vision_config=vision_config().to_dict(), text_config=text,
                                projection_dim=16)).eval()


def picture(kind, gen):
    """A 3x16x16 pixel tensor: a cross ("alice"), stripes ("bob"), or one bright channel (a color)."""
    x = 0.3 * torch.randn(3, IMAGE, IMAGE, generator=gen)
    if kind == "alice":
        x[:, 4:12, 6:10] += 2.0
        x[:, 6:10, 4:12] += 2.0
    elif kind == "bob":
        x[:, :, ::4] += 2.0
    else:
        x[["red", "green", "blue"].index(kind)] += 2.0
    return x


def qa_items(seed=0):
    gen = torch.Generator().manual_seed(seed)
    forget = [(picture("alice", gen), WHO, "alice") for _ in range(8)]
    retain = ([(picture("bob", gen), WHO, "bob") for _ in range(8)]
              + [(picture(c, gen), COLOR, c) for c in ("red", "green", "blue") for _ in range(3)])
    return forget, retain


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before):
    return [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@trained_once
def trained_llava_state():
    model = tiny_llava()
    forget, retain = qa_items()
    (batch,) = LlavaAdapter(model, tokenizer=make_tokenizer()).make_qa_batches(forget + retain, batch_size=64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(50):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().state_dict()


@pytest.fixture(scope="module")
def trained():
    """State of a tiny LLaVA trained (HF's own loss) to name "alice" and "bob" and tell colors."""
    return {k: v.clone() for k, v in trained_llava_state().items()}


def trained_llava(state):
    model = tiny_llava(seed=123)
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("strategy, n_image", [("default", N_PATCHES), ("full", N_PATCHES + 1)])
def test_qa_batches_follow_the_prompt_and_the_image_token_count_llava_checks(tokenizer, strategy, n_image):
    model = tiny_llava(strategy=strategy)
    gen = torch.Generator().manual_seed(0)
    images = [picture("alice", gen), picture("red", gen)]
    ad = LlavaAdapter(model, tokenizer=tokenizer)
    (batch,) = ad.make_qa_batches([(images[0], WHO, "alice"), (images[1], COLOR, "red")], batch_size=2)

    def ids(*words):
        return [ID[w] for w in words]
    prompt_a = ids("USER:") + [ID["<image>"]] * n_image + ids("who", "is", "this", "?", "ASSISTANT:")
    prompt_b = ids("USER:") + [ID["<image>"]] * n_image + ids("what", "color", "is", "this", "?", "ASSISTANT:")
    row_a, row_b = prompt_a + ids("alice", "</s>"), prompt_b + ids("red", "</s>")
    assert batch["input_ids"].tolist() == [row_a + ids("<pad>"), row_b]  # right-padded
    assert batch["attention_mask"].tolist() == [[1] * len(row_a) + [0], [1] * len(row_b)]
    assert batch["labels"].tolist() == [[-100] * len(prompt_a) + ids("alice", "</s>") + [-100],
                                        [-100] * len(prompt_b) + ids("red", "</s>")]
    assert torch.equal(batch["pixel_values"], torch.stack(images))

    # LLaVA itself accepts the image token count, and its own shifted loss equals the adapter's
    hf = model(**batch).loss
    assert torch.allclose(ad.forget_loss(model, batch), hf, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ad.retain_loss(model, batch), hf, rtol=1e-5, atol=1e-6)

    # a LlavaProcessor expands the image token by its own logic: same inputs as tokenizer + image processor
    rng = np.random.default_rng(0)
    pil = [Image.fromarray((rng.random((20, 24, 3)) * 255).astype("uint8")) for _ in range(2)]
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy=strategy, num_additional_image_tokens=1)
    items = [(pil[0], WHO, "bob"), (pil[1], COLOR, "green")]
    (by_processor,) = LlavaAdapter(model, processor=processor).make_qa_batches(items)
    (by_parts,) = LlavaAdapter(model, tokenizer=tokenizer, image_processor=image_processor).make_qa_batches(items)
    assert by_processor.keys() == by_parts.keys()
    assert all(torch.equal(by_processor[k], by_parts[k]) for k in by_parts)
    assert (by_processor["input_ids"] == ID["<image>"]).sum(1).tolist() == [n_image, n_image]
    model(**by_processor)


def test_bad_qa_input_is_refused(tokenizer):
    model = tiny_llava()
    image = torch.zeros(3, IMAGE, IMAGE)
    with pytest.raises(SlugError, match="need the model's tokenizer"):
        LlavaAdapter(model).make_qa_batches([(image, WHO, "alice")])
    ad = LlavaAdapter(model, tokenizer=tokenizer)
    with pytest.raises(SlugError, match=r"each item is \(image, question, answer\)"):
        ad.make_qa_batches([(image, WHO)])
    with pytest.raises(SlugError, match="PIL images need the LLaVA image processor"):
        ad.make_qa_batches([(Image.new("RGB", (IMAGE, IMAGE)), WHO, "alice")])
    with pytest.raises(SlugError, match="tokenizes to 0 image tokens"):
        LlavaAdapter(model, tokenizer=make_plain_tokenizer()).make_qa_batches([(image, WHO, "alice")])
    with pytest.raises(SlugError, match="prompt must hold"):
        LlavaAdapter(model, tokenizer=tokenizer, prompt="USER: {question}")


def make_plain_tokenizer():
    """A tokenizer that does not know the image token (it maps to <unk>)."""
    vocab = {w: i for w, i in ID.items() if w != "<image>"}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def test_vision_tower_is_found_by_identity_whatever_the_layout():
    model = tiny_llava()
    tower, prefix = vision_tower_of(model)
    assert tower is model.model.vision_tower and prefix == TOWER
    assert isinstance(get_adapter(model), LlavaAdapter)

    class Legacy(nn.Module):  # transformers 4.x: towers at the top level
        def __init__(self):
            super().__init__()
            self.vision_tower = CLIPVisionModel(vision_config())
            self.language_model = nn.Linear(4, 4)

    class Accessor(nn.Module):  # a tower under any name, reachable only through get_vision_tower()
        def __init__(self):
            super().__init__()
            self.encoders = nn.ModuleDict({"image": CLIPVisionModel(vision_config())})

        def get_vision_tower(self):
            return self.encoders["image"]

    legacy, accessor = Legacy(), Accessor()
    assert vision_tower_of(legacy) == (legacy.vision_tower, "vision_tower.")
    assert vision_tower_of(accessor) == (accessor.encoders["image"], "encoders.image.")
    with pytest.raises(SlugError, match="Linear has no vision tower"):
        vision_tower_of(nn.Linear(2, 2))

    # transformers 4 named the tower's tensors vision_model.*, CLIPModel.vision_model's have no prefix
    tower = ["vision_model.embeddings.class_embedding", "vision_model.encoder.layers.0.mlp.fc1.weight"]
    clip = ["embeddings.class_embedding", "encoder.layers.0.mlp.fc1.weight"]
    assert match_vision_towers(tower, clip) == dict(zip(tower, clip))
    assert match_vision_towers(clip, tower) == dict(zip(clip, tower))
    assert match_vision_towers(["weight"], ["a.weight", "b.weight"]) == {}  # ambiguous: no match


def test_mentions_matches_whole_words_ignoring_case():
    assert mentions("It is Alice.", "alice") and mentions("ALICE", "alice") and mentions("alice's hat", "Alice")
    assert mentions("That is Mr. Bob Smith!", "bob smith") and mentions("(alice)", "alice")
    assert not mentions("malice", "alice") and not mentions("alicent", "alice") and not mentions("", "alice")


def test_answers_and_captions_name_a_concept_by_the_same_rule():
    # answer -> whether it names "Elon Musk" (by hand): any spacing between the words, whole words, any case
    answers = {"Elon  Musk": True, "It is elon\nmusk.": True, "ELON MUSK": True, "Elon\tMusk's car": True,
               "Elon Muskrat": False, "Musk": False, "elon-musk": False, "Elon Musk": True}
    for expected in ("Elon Musk", "Elon  Musk", " elon musk "):
        assert {a: mentions(a, expected) for a in answers} == answers, expected
        image = torch.zeros(3, 2, 2)
        forget = split_by_concept([(image, a) for a in answers], expected).forget.captions
        assert forget == [a for a, hit in answers.items() if hit]  # captions: the same verdicts


def test_vlm_mode_forgets_the_name_and_edits_one_vision_tensor(trained, tokenizer, tmp_path):
    model = trained_llava(trained)
    forget, retain = qa_items()
    ad = LlavaAdapter(model, tokenizer=tokenizer)
    assert ad.param_names() and all(n.startswith(TOWER) and not n.startswith(UNUSED) for n in ad.param_names())
    forget_b, retain_b = ad.make_qa_batches(forget, 4), ad.make_qa_batches(retain, 8)
    before = snapshot(model)

    def hf_loss(batches):  # transformers' own loss, independent of the adapter's
        with torch.no_grad():
            return sum(model(**b).loss.item() for b in batches) / len(batches)
    f0, r0 = hf_loss(forget_b), hf_loss(retain_b)
    assert answer_rate(model, forget, tokenizer=tokenizer, max_new_tokens=3)["rate"] == 100.0
    retain0 = answer_rate(model, retain, tokenizer=tokenizer, max_new_tokens=3)["rate"]
    assert retain0 >= 90

    def criterion(m):
        rate = answer_rate(ad, forget, max_new_tokens=3)["rate"]
        return rate == 0.0, {"forget": rate, "utility": answer_rate(ad, retain, max_new_tokens=3)["rate"]}

    result = slug_fast.unlearn(model, forget_b, retain_b, criterion, tokenizer=tokenizer, group=False,
                               progress=False)

    assert result.backends["adapter"] == "llava"
    assert changed(model, before) == result.layers and len(result.layers) == 1
    (layer,) = result.layers
    assert layer.startswith(TOWER) and not layer.startswith(UNUSED)
    after = answer_rate(model, forget, tokenizer=tokenizer, max_new_tokens=3)
    assert after["rate"] == 0.0 and not any("alice" in a for a in after["answers"])
    assert answer_rate(model, retain, tokenizer=tokenizer, max_new_tokens=3)["rate"] >= retain0 - 20
    f1, r1 = hf_loss(forget_b), hf_loss(retain_b)
    assert f1 - f0 > 0.3  # SLUG ascended the forget loss
    assert abs(r1 - r0) < 0.25 * (f1 - f0)  # and barely moved the retain loss

    path = result.save(tmp_path / "delta")
    fresh = trained_llava(trained)
    assert slug_fast.apply_delta(fresh, path) == result.layers
    edited = snapshot(model)
    assert all(torch.equal(p.detach(), edited[n]) for n, p in fresh.named_parameters())


def clip_and_llava():
    """A tiny CLIPModel and a tiny LLaVA whose vision tower holds the CLIP vision weights."""
    clip, llava = tiny_clip(), tiny_llava()
    vision_tower_of(llava)[0].load_state_dict(clip.vision_model.state_dict())
    return clip, llava


def caption_pairs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    forget = [(picture("alice", gen), "a photo of alice") for _ in range(8)]
    retain = [(picture(k, gen), f"a photo of {k}") for k in ("bob", "red", "green", "blue") for _ in range(4)]
    return forget, retain


def test_clip_mode_mirrors_every_edit_into_the_llava_tower(tokenizer, tmp_path):
    clip, llava = clip_and_llava()
    ad = LlavaAdapter(llava, mode="clip", clip_model=clip, clip_tokenizer=tokenizer)
    names = ad.param_names()
    assert ad.target is clip and names and all(n.startswith("vision_model.") for n in names)
    llava_names = [ad.delta_name(n) for n in names]
    assert all(n.startswith(TOWER) and not n.startswith(UNUSED) for n in llava_names)
    assert len(llava_names) == len({n for n, _ in llava.named_parameters()
                                    if n.startswith(TOWER) and not n.startswith(UNUSED)})
    forget, retain = caption_pairs()
    forget_b, retain_b = ad.make_batches(forget, 8), ad.make_batches(retain, 16)

    def clip_outputs(batch):
        with torch.no_grad():
            return clip(**batch, return_loss=True)

    # the adapter's CLIP losses equal the ones computed from transformers' own outputs
    out = clip_outputs(forget_b[0])
    cos = F.cosine_similarity(out.image_embeds, out.text_embeds).mean().item()
    assert ad.forget_loss(clip, forget_b[0]).item() == pytest.approx(1 - cos, abs=1e-5)
    assert ad.retain_loss(clip, retain_b[0]).item() == pytest.approx(clip_outputs(retain_b[0]).loss.item(), abs=1e-5)

    llava0, clip0 = snapshot(llava), snapshot(clip)
    clip_params, llava_params = dict(clip.named_parameters()), dict(llava.named_parameters())
    seen = []

    def criterion(model):
        assert model is llava  # the criterion judges the LLaVA model
        mirrored = all(torch.equal(clip_params[c].detach(), llava_params[ad.delta_name(c)].detach()) for c in names)
        seen.append((mirrored, bool(changed(llava, llava0))))
        o = clip_outputs(forget_b[0])
        return F.cosine_similarity(o.image_embeds, o.text_embeds).mean().item() < cos - 0.2

    result = slug_fast.unlearn(llava, forget_b, retain_b, criterion, mode="clip", clip_model=clip,
                               clip_tokenizer=tokenizer, group=False, progress=False)

    assert seen and all(m for m, _ in seen) and all(moved for _, moved in seen)
    assert changed(clip, clip0) == result.layers and len(result.layers) == 1
    (clip_layer,) = result.layers
    llava_layer = ad.delta_name(clip_layer)
    assert changed(llava, llava0) == [llava_layer] and llava_layer.startswith(TOWER)
    assert torch.equal(llava_params[llava_layer].detach(), clip_params[clip_layer].detach())
    assert list(result.delta) == [llava_layer]

    path = result.save(tmp_path / "delta")
    _, fresh = clip_and_llava()
    assert slug_fast.apply_delta(fresh, path) == [llava_layer]
    edited = snapshot(llava)
    assert all(torch.equal(p.detach(), edited[n]) for n, p in fresh.named_parameters())


def test_clip_model_that_differs_from_the_tower_is_refused_and_nothing_changes(tokenizer):
    clip, llava = clip_and_llava()
    with torch.no_grad():  # two differing tensors: the error names the first in the tower's order
        clip.vision_model.encoder.layers[1].mlp.fc1.weight[0, 0] += 1e-3
        clip.vision_model.encoder.layers[2].self_attn.q_proj.weight[0, 0] += 1.0
    llava0, clip0 = snapshot(llava), snapshot(clip)
    forget, retain = caption_pairs()
    batches = HFClipAdapter(clip, tokenizer=tokenizer).make_batches(forget + retain, 8)
    first = (f"first differing tensor LLaVA '{TOWER}encoder.layers.1.mlp.fc1.weight' vs clip_model "
             "'vision_model.encoder.layers.1.mlp.fc1.weight'")
    with pytest.raises(SlugError, match=first):
        slug_fast.unlearn(llava, batches, batches, lambda m: True, mode="clip", clip_model=clip,
                          clip_tokenizer=tokenizer, progress=False)
    assert not changed(llava, llava0) and not changed(clip, clip0)

    wider = CLIPModel(CLIPConfig(vision_config={**vision_config().to_dict(), "intermediate_size": 48},
                                 text_config=tiny_clip().config.text_config.to_dict(), projection_dim=16))
    with pytest.raises(SlugError, match=r"mlp.fc1.weight' have shape/dtype \(64, 32\)/torch.float32 vs \(48, 32\)"):
        LlavaAdapter(llava, mode="clip", clip_model=wider)
    with pytest.raises(SlugError, match="mode='clip' needs clip_model="):
        LlavaAdapter(llava, mode="clip")
    with pytest.raises(SlugError, match="clip_model= is used with mode='clip' only"):
        LlavaAdapter(llava, clip_model=clip)
    with pytest.raises(SlugError, match=r"mode must be one of \('vlm', 'clip'\)"):
        LlavaAdapter(llava, mode="text")
    with pytest.raises(SlugError, match="has no text tower"):
        LlavaAdapter(llava, mode="clip", clip_model=CLIPVisionModel(vision_config()))
    assert not changed(llava, llava0) and not changed(clip, clip0)


@pytest.mark.parametrize("store, checkpointing", [("full", False), ("chunked", True)])
def test_vlm_mode_allocates_vision_tower_gradients_only(trained, tokenizer, store, checkpointing):
    model = trained_llava(trained)
    forget, retain = qa_items()
    ad = LlavaAdapter(model, tokenizer=tokenizer)
    forget_b, retain_b = ad.make_qa_batches(forget, 4), ad.make_qa_batches(retain, 8)
    tower = set(ad.param_names())
    others = {n: p for n, p in model.named_parameters() if n not in tower}
    assert any(".language_model." in n or n.startswith("language_model.") for n in others)
    graded, seen_training = set(), []
    for name, p in model.named_parameters():
        p.register_hook(lambda g, name=name: graded.add(name))  # fires whenever autograd makes its gradient
    layers = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]

    def loss(module, batch):
        seen_training.append([m.training for m in layers])
        assert all(p.grad is None for p in others.values())
        return answer_loss(module, batch)

    result = slug_fast.unlearn(model, forget_b, retain_b, lambda m: (True, {}), forget_loss=loss,
                               retain_loss=loss, adapter=ad, checkpointing=checkpointing, store=store,
                               passes=2 if store == "chunked" else None, apply=False, progress=False)
    assert graded and graded <= tower  # no language-model or projector gradient was ever computed
    assert all(p.grad is None for p in model.parameters())
    assert result.memory.checkpointing is checkpointing and result.memory.mode == store
    assert all(flags == [checkpointing] * len(layers) for flags in seen_training)  # the LM layers recompute
    assert not any(m.training for m in model.modules())


def test_the_language_models_embeddings_and_head_are_never_candidates(tokenizer):
    model = tiny_llava()
    ad = LlavaAdapter(model, tokenizer=tokenizer)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    lm = [n for n in shapes if n.endswith("embed_tokens.weight") or n.startswith("lm_head.")]
    assert len(lm) == 2 and all(is_eligible(n, shapes[n]) for n in lm)  # the generic rule alone keeps them
    assert not any(ad.eligible(n, shapes[n]) for n in lm)
    # the rest of the model: the generic rule, by hand (>= 2 dims, no bias/norm/embedding/... word)
    assert all(ad.eligible(n, shapes[n]) == is_eligible(n, shapes[n]) for n in shapes if n not in lm)

    forget, retain = qa_items()
    tower = ad.used_tower_names()
    decoder = [n for n in shapes if ".layers.0.self_attn.q_proj.weight" in n and not n.startswith(TOWER)]
    assert len(decoder) == 1  # a language-model layer that stays a candidate
    result = slug_fast.unlearn(model, ad.make_qa_batches(forget, 4), ad.make_qa_batches(retain, 8),
                               lambda m: (True, {}), tokenizer=tokenizer, params=[*tower, *decoder, *lm],
                               apply=False, progress=False)
    assert set(result.stats.names) == {n for n in [*tower, *decoder] if is_eligible(n, shapes[n])}


def test_answering_and_tracing_the_tower_leave_modes_and_flags_as_they_were(tokenizer):
    model = tiny_llava()
    model.train()
    model.model.vision_tower.eval()  # mixed modes: each submodule's own must come back
    frozen = next(n for n, _ in model.named_parameters() if n.startswith(TOWER) and n.endswith("q_proj.weight"))
    dict(model.named_parameters())[frozen].requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = []
    hook = model.model.language_model.layers[0].register_forward_hook(lambda m, i, o: seen.append(m.training))
    ad = LlavaAdapter(model, tokenizer=tokenizer)
    assert frozen in ad.used_tower_names()  # traced with every tower tensor requiring grad
    forget, _ = qa_items()
    answers = generate_answers(ad, forget[:2], max_new_tokens=2)
    hook.remove()
    assert len(answers) == 2 and seen and not any(seen)  # generated in eval mode
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with pytest.raises(SlugError, match=r"each item is \(image, question, expected_answer\) with a non-empty"):
        answer_rate(ad, [(forget[0][0], WHO, " ")])


class CountingGenerate:
    """Wraps model.generate, recording how many prompts each call takes."""

    def __init__(self, model):
        self.batches, self.real = [], model.generate
        model.generate = self

    def __call__(self, *args, **kwargs):
        self.batches.append(kwargs["input_ids"].shape[0])
        return self.real(*args, **kwargs)


def test_answer_rate_counts_the_answers_that_name_the_expected_text(tokenizer):
    model = tiny_llava(seed=5)  # untrained: greedy answers known by running it (below, by hand)
    forget, retain = qa_items()
    images = [x for x, _, _ in forget[:3] + retain[8:11]]
    questions = [WHO] * 3 + [COLOR] * 3  # two prompt lengths: two groups of batches
    answers = generate_answers(LlavaAdapter(model, tokenizer=tokenizer), list(zip(images, questions)),
                               max_new_tokens=4, batch_size=2)
    assert answers[:3] == answers[4:5] * 3 and answers[3] == answers[5] and "alice" in answers[3]
    assert "assistant" in answers[0].lower() and "alice" not in answers[0]
    expected = ["assistant", "bob", "bob", "alice", "Assistant", "of  alice"]
    hits = [True, False, False, True, True, True]  # whole words, any case, any spacing (by hand)
    items = [[x, q, e] for x, q, e in zip(images, questions, expected)]  # lists are items too
    calls = CountingGenerate(model)
    out = answer_rate(model, items, tokenizer=tokenizer, max_new_tokens=4, batch_size=2)
    assert out == {"rate": 100.0 * sum(hits) / 6, "hits": 4, "total": 6, "answers": answers}
    assert sorted(calls.batches) == [1, 1, 2, 2]  # 3 + 3 prompts, at most 2 a call
    # the defaults: 16 new tokens, 8 prompts a call
    ad = LlavaAdapter(model, tokenizer=tokenizer)
    sixteen, seventeen = (generate_answers(ad, items[3:4], max_new_tokens=n, batch_size=1) for n in (16, 17))
    assert sixteen != seventeen and sixteen[0].startswith(answers[3] + " ")  # a word a token
    calls.batches.clear()
    assert answer_rate(model, items[3:4] * 9, tokenizer=tokenizer)["answers"] == sixteen * 9
    assert calls.batches == [8, 1]

    # a prompt of one's own, and the processor (or its parts) of a model passed bare
    prompt = "USER: {image}\nwhat {question} ASSISTANT: a"
    mine = answer_rate(model, items, tokenizer=tokenizer, prompt=prompt, max_new_tokens=4)
    assert mine == answer_rate(LlavaAdapter(model, tokenizer=tokenizer, prompt=prompt), items, max_new_tokens=4)
    assert mine["answers"] != answers
    rng = np.random.default_rng(0)
    pil = [Image.fromarray((rng.random((20, 24, 3)) * 255).astype("uint8")) for _ in range(2)]
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    pil_items = [(pil[0], WHO, "alice"), (pil[1], COLOR, "assistant")]
    by_adapter = answer_rate(LlavaAdapter(model, processor=processor), pil_items, max_new_tokens=3)
    assert answer_rate(model, pil_items, processor=processor, max_new_tokens=3) == by_adapter
    assert answer_rate(model, pil_items, tokenizer=tokenizer, image_processor=image_processor,
                       max_new_tokens=3) == by_adapter


@pytest.mark.parametrize("bad", [
    lambda x: (x, WHO),  # no expected answer
    lambda x: (x, WHO, "alice", "bob"),
    lambda x: (x, WHO, 3),
    lambda x: (x, WHO, ""),
    lambda x: (x, WHO, " \n"),
    lambda x: {"image": x, "question": WHO, "answer": "alice"},
    lambda x: "alice",
])
def test_answer_rate_refuses_a_bad_item_before_generating(tokenizer, bad):
    model = tiny_llava()
    forget, _ = qa_items()
    calls = CountingGenerate(model)
    with pytest.raises(SlugError, match=r"each item is \(image, question, expected_answer\)"):
        answer_rate(model, forget[:2] + [bad(forget[0][0])], tokenizer=tokenizer, max_new_tokens=2)
    assert calls.batches == []
    with pytest.raises(SlugError, match=r"no \(image, question, expected_answer\) items"):
        answer_rate(model, iter([]), tokenizer=tokenizer)
