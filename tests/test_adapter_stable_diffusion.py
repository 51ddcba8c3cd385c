"""The Stable Diffusion adapter on tiny pipelines built offline: the edit lands in the pipeline's
text encoder and nowhere else, deltas round-trip, mismatched CLIP models are refused."""
import copy
import json
import re
import string

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import (AutoencoderKL, DDIMScheduler,  # noqa: E402
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextModel,  # noqa: E402
                          CLIPTextModelWithProjection, CLIPTokenizer)

import slug_fast  # noqa: E402
from slug_fast.adapters.hf_clip import HFClipAdapter  # noqa: E402
from slug_fast.adapters.stable_diffusion import StableDiffusionAdapter  # noqa: E402
from slug_fast.errors import SlugError  # noqa: E402
from slug_fast.eval import generate_and_score  # noqa: E402

HIDDEN, SIZE, MAX_LEN = 32, 32, 16
FORGET_CAPTION = "a cat"
RETAIN_CAPTIONS = ["a dog", "a car", "a tree", "a house", "a bird", "a boat", "a cup", "a shoe"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A CLIP BPE tokenizer over single letters (no merges), written to files offline."""
    root = tmp_path_factory.mktemp("tokenizer")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + ".":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=MAX_LEN)


def make_clip(tok, seed, layers=3, projection=16) -> CLIPModel:
    text = dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=layers,
                num_attention_heads=4, max_position_embeddings=MAX_LEN, projection_dim=projection,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=SIZE, patch_size=8, projection_dim=projection)
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)).eval()


def encoder_from(clip, layers=None, cls=CLIPTextModel, dtype=torch.float32):
    """A standalone text encoder holding `clip`'s text weights (its first `layers` layers)."""
    config = copy.deepcopy(clip.config.text_config)
    config.num_hidden_layers = layers or config.num_hidden_layers
    enc = cls(config).eval()
    core = enc.text_model if isinstance(getattr(enc, "text_model", None), nn.Module) else enc
    n = config.num_hidden_layers
    layer = re.compile(r"encoder\.layers\.(\d+)\.")
    core.load_state_dict({k: v for k, v in clip.text_model.state_dict().items()
                          if not layer.search(k) or int(layer.search(k).group(1)) < n})
    if cls is CLIPTextModelWithProjection:
        enc.text_projection.load_state_dict(clip.text_projection.state_dict())
    return enc.to(dtype)


def unet_and_vae(cross_dim, **unet_extra):
    torch.manual_seed(100)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_dim, norm_num_groups=8, attention_head_dim=4, **unet_extra)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=8, sample_size=SIZE, layers_per_block=1)
    return unet, vae


def make_pipe(tok, text_encoder) -> StableDiffusionPipeline:
    unet, vae = unet_and_vae(HIDDEN)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sdxl(tok, enc1, enc2) -> StableDiffusionXLPipeline:
    pooled = enc2.config.projection_dim
    unet, vae = unet_and_vae(2 * HIDDEN, addition_embed_type="text_time", addition_time_embed_dim=8,
                             projection_class_embeddings_input_dim=6 * 8 + pooled)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=enc1, text_encoder_2=enc2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=sched, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def snapshot(obj) -> dict:
    """Every parameter and buffer of a module, or of every module of a pipeline, cloned."""
    modules = obj.components.items() if hasattr(obj, "components") else [("", obj)]
    return {f"{c}.{k}".lstrip("."): v.detach().clone() for c, m in modules if isinstance(m, nn.Module)
            for k, v in m.state_dict().items()}


def changed(before, after) -> list[str]:
    assert before.keys() == after.keys()
    return [k for k in before if not torch.equal(before[k], after[k])]


def pair_sets(tok, clip, seed=1):
    """(forget, retain) CLIP batches: random images captioned FORGET_CAPTION / other captions."""
    ad = HFClipAdapter(clip, tokenizer=tok)
    images = torch.rand(24, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    forget = ad.make_batches([(images[i], FORGET_CAPTION) for i in range(8)], 8)
    retain = ad.make_batches([(images[8 + i], RETAIN_CAPTIONS[i % 8]) for i in range(16)], 8)
    return forget, retain


@torch.no_grad()
def forget_cos(clip, batches) -> float:
    """Mean cosine of the forget pairs, from CLIPModel's own normalised embeddings."""
    return torch.cat([(o.image_embeds * o.text_embeds).sum(-1) for o in (clip(**b) for b in batches)]).mean().item()


@torch.no_grad()
def retain_loss(clip, batches) -> float:
    """CLIPModel's own contrastive loss, averaged over batches."""
    return sum(clip(**b, return_loss=True).loss.item() for b in batches) / len(batches)


def cos_drop(clip, forget, drop=0.1):
    """Criterion: the forget pairs' mean cosine fell `drop` below where it started."""
    start = forget_cos(clip, forget)

    def criterion(pipe):
        return forget_cos(clip, forget) < start - drop

    return criterion


@torch.no_grad()
def hidden(encoder, tok, text):
    return encoder(**tok([text], padding="max_length", max_length=MAX_LEN, return_tensors="pt")).last_hidden_state


def generate(pipe, prompt, seed=0, **kw):
    out = pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(seed), height=SIZE,
               width=SIZE, output_type="pt", **kw)
    return out.images


def test_unlearn_edits_one_encoder_tensor_mirrored_and_round_trips(tok, tmp_path):
    clip = make_clip(tok, 0)
    pipe = make_pipe(tok, encoder_from(clip))
    fresh = copy.deepcopy(pipe)  # the original pipeline, for the delta
    image_before = generate(pipe, FORGET_CAPTION)
    forget, retain = pair_sets(tok, clip)
    pipe_before, clip_before = snapshot(pipe), snapshot(clip)
    cos0, retain0 = forget_cos(clip, forget), retain_loss(clip, retain)
    in_sync = []
    reached = cos_drop(clip, forget)

    def criterion(p):
        # the pipeline's encoder must already carry the step the CLIP model is being evaluated at
        in_sync.append(torch.equal(hidden(p.text_encoder, tok, FORGET_CAPTION),
                                   hidden(clip.text_model, tok, FORGET_CAPTION)))
        return reached(p), {"utility": -abs(retain_loss(clip, retain) - retain0)}  # keep the least harmful layer

    result = slug_fast.unlearn(pipe, forget, retain, criterion, clip_model=clip, tokenizer=tok, group=False,
                               progress=False)

    assert len(in_sync) == sum(len(c.search.trace) for c in result.candidates) and all(in_sync)
    assert result.backends["adapter"] == "stable_diffusion" and list(result.fronts) == ["text"]
    pipe_after, clip_after = snapshot(pipe), snapshot(clip)
    [clip_name] = changed(clip_before, clip_after)
    [pipe_name] = changed(pipe_before, pipe_after)
    assert result.layers == [clip_name] and clip_name.startswith("text_model.")
    assert pipe_name.startswith("text_encoder.") and pipe_name.endswith(clip_name.removeprefix("text_model."))
    assert list(result.delta) == [pipe_name]
    delta = result.delta[pipe_name]
    assert torch.equal(pipe_after[pipe_name], pipe_before[pipe_name] + delta)
    assert torch.equal(clip_after[clip_name], pipe_after[pipe_name])
    assert torch.equal(hidden(pipe.text_encoder, tok, FORGET_CAPTION), hidden(clip.text_model, tok, FORGET_CAPTION))

    forget_up = cos0 - forget_cos(clip, forget)  # forget loss = 1 - cos
    assert forget_up > 0.1
    assert abs(retain_loss(clip, retain) - retain0) < 0.25 * forget_up

    image_after = generate(pipe, FORGET_CAPTION)
    assert image_after.shape == image_before.shape and torch.isfinite(image_after).all()
    assert not torch.equal(image_after, image_before)

    path = result.save(tmp_path / "delta")
    assert slug_fast.apply_delta(fresh, path) == [pipe_name]
    assert not changed(pipe_after, snapshot(fresh))


def test_a_clip_model_that_does_not_match_is_refused(tok):
    clip = make_clip(tok, 0)
    pipe = make_pipe(tok, encoder_from(clip))
    forget, retain = pair_sets(tok, clip)
    pipe_before = snapshot(pipe)

    other = copy.deepcopy(clip)
    with torch.no_grad():
        other.text_model.encoder.layers[1].mlp.fc1.weight[3, 5] += 1e-3
        other.text_model.encoder.layers[2].self_attn.q_proj.weight.add_(1.0)
    other_before = snapshot(other)
    first = "'text_model.encoder.layers.1.mlp.fc1.weight'"
    with pytest.raises(SlugError, match=f"first differing tensor {first}"):
        StableDiffusionAdapter(pipe, other)
    with pytest.raises(SlugError, match=f"first differing tensor {first}"):
        slug_fast.unlearn(pipe, forget, retain, lambda p: True, clip_model=other, tokenizer=tok, progress=False)
    with pytest.raises(SlugError, match="first differing tensor 'text_model.embeddings.token_embedding.weight'"):
        StableDiffusionAdapter(pipe, make_clip(tok, 1))
    with pytest.raises(SlugError, match=r"token_embedding.weight' has shape \(56, 32\), text_encoder.*\(56, 16\)"):
        wide = make_clip(tok, 0)
        narrow = make_clip(tok, 0)
        narrow.config.text_config.hidden_size = 16
        StableDiffusionAdapter(make_pipe(tok, CLIPTextModel(narrow.config.text_config)), wide)
    deeper = copy.deepcopy(clip.config.text_config)
    deeper.num_hidden_layers = 4
    longer = CLIPTextModel(deeper)
    longer.load_state_dict(clip.text_model.state_dict(), strict=False)  # layer 3 has no CLIP counterpart
    with pytest.raises(SlugError, match="text_encoder.encoder.layers.3.self_attn.k_proj.weight has no counterpart"):
        StableDiffusionAdapter(make_pipe(tok, longer), clip)
    with pytest.raises(SlugError, match="needs clip_model="):
        slug_fast.unlearn(pipe, forget, retain, lambda p: True, tokenizer=tok, progress=False)
    with pytest.raises(SlugError, match=r"no text encoder 'text_encoder_2'; pass encoder= one of \['text_encoder'\]"):
        StableDiffusionAdapter(pipe, clip, encoder="text_encoder_2")
    assert not changed(pipe_before, snapshot(pipe))
    assert not changed(other_before, snapshot(other))


def test_fp16_encoder_matches_within_rounding_and_is_edited_in_its_dtype(tok, tmp_path):
    clip = make_clip(tok, 0)
    pipe = make_pipe(tok, encoder_from(clip, dtype=torch.float16))
    fresh = copy.deepcopy(pipe)
    forget, retain = pair_sets(tok, clip)
    pipe_before, clip_before = snapshot(pipe), snapshot(clip)

    off = copy.deepcopy(pipe)
    with torch.no_grad():
        w = off.text_encoder.encoder.layers[0].self_attn.out_proj.weight
        w[0, 0] = w[0, 0] * 1.01  # ten times fp16's rounding
    with pytest.raises(SlugError, match="first differing tensor 'text_model.encoder.layers.0.self_attn.out_proj"):
        StableDiffusionAdapter(off, clip)

    result = slug_fast.unlearn(pipe, forget, retain, cos_drop(clip, forget), clip_model=clip, tokenizer=tok,
                               group=False, progress=False)
    [pipe_name] = changed(pipe_before, snapshot(pipe))
    [clip_name] = changed(clip_before, snapshot(clip))
    assert result.layers == [clip_name] and list(result.delta) == [pipe_name]
    delta = result.delta[pipe_name]
    edited = dict(pipe.text_encoder.named_parameters())[pipe_name.removeprefix("text_encoder.")]
    assert edited.dtype == torch.float16
    assert torch.equal(edited.detach(), (pipe_before[pipe_name].float() + delta).half())
    assert torch.equal(dict(clip.named_parameters())[clip_name].detach(), clip_before[clip_name] + delta)
    assert slug_fast.load_delta(result.save(tmp_path / "d"))[1]["tensors"][pipe_name]["dtype"] == "float16"
    slug_fast.apply_delta(fresh, tmp_path / "d")
    assert not changed(snapshot(pipe), snapshot(fresh))


def test_sd2_like_encoder_with_a_layer_fewer_never_edits_the_missing_layer(tok):
    clip = make_clip(tok, 0, layers=3)
    pipe = make_pipe(tok, encoder_from(clip, layers=2))  # like SD 2.x: the CLIP tower's last layer is dropped
    forget, retain = pair_sets(tok, clip)
    pipe_before, clip_before = snapshot(pipe), snapshot(clip)
    ad = StableDiffusionAdapter(pipe, clip)  # tokenizer: the pipeline's own
    assert not any(".layers.2." in n for n in ad.param_names())
    pairs = [(torch.rand(3, SIZE, SIZE), c) for c in RETAIN_CAPTIONS[:3]]
    [batch] = ad.make_batches(pairs)
    [oracle] = HFClipAdapter(clip, tokenizer=tok).make_batches(pairs)
    assert batch.keys() == oracle.keys() and all(torch.equal(batch[k], oracle[k]) for k in batch)
    with torch.no_grad():
        text = clip(**batch).text_embeds
    assert torch.allclose(ad.text_features(RETAIN_CAPTIONS[:3]), text, atol=1e-6)
    with pytest.raises(SlugError, match="has no counterpart in the pipeline's text_encoder"):
        ad.delta_name("text_model.encoder.layers.2.mlp.fc1.weight")

    for strategy in ("deepest", "best"):
        result = slug_fast.unlearn(pipe, forget, retain, cos_drop(clip, forget, 0.05), clip_model=clip,
                                   tokenizer=tok, strategy=strategy, apply=False, progress=False)
        assert result.stats.names and not any(".layers.2." in n for n in result.stats.names)
        assert all(".layers.2." not in n for c in result.candidates for n in c.layers)
    # the chunked store with the CLIP model's checkpointing: the same pipeline delta, bit for bit
    lean = slug_fast.unlearn(pipe, forget, retain, cos_drop(clip, forget, 0.05), clip_model=clip, tokenizer=tok,
                             strategy="best", apply=False, progress=False, store="chunked", passes=3,
                             checkpointing=True)
    assert lean.memory.mode == "chunked" and lean.memory.checkpointing
    assert lean.layers == result.layers and lean.step == result.step and lean.delta.keys() == result.delta.keys()
    assert all(torch.equal(lean.delta[k], result.delta[k]) for k in result.delta)
    result = slug_fast.unlearn(pipe, forget, retain, cos_drop(clip, forget, 0.05), clip_model=clip, tokenizer=tok,
                               strategy="deepest", progress=False)
    pipe_changed, clip_changed = changed(pipe_before, snapshot(pipe)), changed(clip_before, snapshot(clip))
    assert sorted(clip_changed) == sorted(result.layers) and not any(".layers.2." in n for n in clip_changed)
    assert sorted(pipe_changed) == sorted(result.delta)
    assert sorted(pipe_changed) == sorted("text_encoder." + n.removeprefix("text_model.") for n in clip_changed)
    assert torch.isfinite(generate(pipe, FORGET_CAPTION)).all()


def test_sdxl_second_encoder_with_projection_and_both_deltas_compose(tok, tmp_path):
    clip1, clip2 = make_clip(tok, 0, layers=2), make_clip(tok, 5, layers=2)
    pipe = make_sdxl(tok, encoder_from(clip1), encoder_from(clip2, cls=CLIPTextModelWithProjection))
    before = snapshot(pipe)
    ad = StableDiffusionAdapter(pipe, clip2, encoder="text_encoder_2")
    pipe_params = dict(pipe.text_encoder_2.named_parameters())
    assert ad.delta_name("text_projection.weight") == "text_encoder_2.text_projection.weight"
    assert "text_projection.weight" in ad.param_names() and "text_projection.weight" in pipe_params
    assert all(ad.delta_name(n).removeprefix("text_encoder_2.") in pipe_params for n in ad.param_names())
    with pytest.raises(SlugError, match="first differing tensor"):
        StableDiffusionAdapter(pipe, clip1, encoder="text_encoder_2")

    deltas = {}
    for encoder, clip in (("text_encoder", clip1), ("text_encoder_2", clip2)):
        forget, retain = pair_sets(tok, clip)
        res = slug_fast.unlearn(pipe, forget, retain, cos_drop(clip, forget), clip_model=clip, tokenizer=tok,
                                encoder=encoder, apply=False, progress=False)
        assert res.delta and all(k.startswith(encoder + ".") for k in res.delta)
        deltas.update(res.delta)
        slug_fast.apply_delta(pipe, res.save(tmp_path / encoder))
    after = snapshot(pipe)
    assert sorted(changed(before, after)) == sorted(deltas)
    assert all(torch.equal(after[k], before[k] + d) for k, d in deltas.items())
    assert torch.isfinite(generate(pipe, FORGET_CAPTION)).all()


def test_generate_and_score_is_deterministic_and_matches_clip_zero_shot(tok):
    clip = make_clip(tok, 0)
    pipe = make_pipe(tok, encoder_from(clip))
    processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    scorer = HFClipAdapter(clip, tokenizer=tok, image_processor=processor)
    prompts, classes = ["a cat", "a dog", "a car"], ["cat", "dog", "car"]
    out = generate_and_score(pipe, prompts, scorer, classes, num_inference_steps=2, seed=7, height=48, width=48,
                             templates=["{}"], labels=["cat", "dog", 2])

    assert out["images"].shape == (3, 3, 48, 48)
    for i, prompt in enumerate(prompts):  # one image per prompt, from a generator seeded seed + i
        alone = pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(7 + i), height=48,
                     width=48, output_type="pt").images
        assert torch.equal(out["images"][i:i + 1], alone)
    with torch.no_grad():
        pil = pipe.numpy_to_pil(out["images"].permute(0, 2, 3, 1).numpy())
        text = tok(classes, padding=True, return_tensors="pt")
        oracle = clip(pixel_values=processor(images=pil, return_tensors="pt")["pixel_values"], **text)
        expected = oracle.logits_per_image.softmax(-1)
    assert out["probabilities"].shape == (3, 3)
    assert torch.allclose(out["probabilities"], expected, atol=1e-5)
    assert out["predicted_index"] == expected.argmax(-1).tolist()
    assert out["predicted"] == [classes[i] for i in out["predicted_index"]]
    truth = [0, 1, 2]
    assert out["correct"] == [p == t for p, t in zip(out["predicted_index"], truth)]
    assert out["accuracy"] == pytest.approx(100 * sum(out["correct"]) / 3)

    plain = generate_and_score(pipe, "a cat", HFClipAdapter(clip, tokenizer=tok), classes, num_inference_steps=2,
                               seed=7, height=48, width=48)
    assert torch.equal(plain["images"], out["images"][:1]) and plain["accuracy"] is None
    assert plain["probabilities"].shape == (1, 3) and torch.allclose(plain["probabilities"].sum(-1), torch.ones(1))
    with pytest.raises(SlugError, match="label 'fish' is not a class"):
        generate_and_score(pipe, prompts, scorer, classes, num_inference_steps=2, seed=7, labels=["cat", "dog", "fish"])
    with pytest.raises(SlugError, match="labels has 1 entries for 3 prompts"):
        generate_and_score(pipe, prompts, scorer, classes, num_inference_steps=2, seed=7, labels=["cat"])
