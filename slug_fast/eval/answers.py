"""Vision-language evaluation: greedy answers of a LLaVA model and how often they name what was expected."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..adapters.llava import DEFAULT_PROMPT, LlavaAdapter
from ..data import concept_pattern
from ..errors import SlugError
from ..modes import training_state


def mentions(answer: str, expected: str) -> bool:
    """Whether `expected` occurs in `answer` as whole words, ignoring case and how the words are
    spaced: the concept matcher of slug_fast.data (`concept_pattern`)."""
    return concept_pattern(expected).search(answer) is not None


@torch.no_grad()
def generate_answers(adapter: LlavaAdapter, items: Sequence[tuple], *, max_new_tokens: int = 16,
                     batch_size: int = 8) -> list[str]:
    """Greedy answers to (image, question, ...) items, in order (the model runs in eval mode)."""
    tok = adapter.need_tokenizer()
    prompts = [adapter.prompt_inputs(item[0], item[1]) for item in items]
    by_length: dict[int, list[int]] = {}
    for i, (ids, _) in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)  # equal lengths: no padding to get wrong
    answers: list[str] = [""] * len(items)
    with training_state(adapter.model, train=False):
        for length, members in by_length.items():
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                ids = torch.tensor([prompts[i][0] for i in chunk], device=adapter.device)
                out = adapter.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids),
                    pixel_values=torch.stack([prompts[i][1] for i in chunk]),
                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=adapter.pad_id())
                for i, row in zip(chunk, out[:, length:]):
                    answers[i] = tok.decode(row, skip_special_tokens=True).strip()
    return answers


def answer_rate(model_or_adapter, items: Sequence[tuple], *, max_new_tokens: int = 16, batch_size: int = 8,
                processor=None, tokenizer=None, image_processor=None, prompt: str = DEFAULT_PROMPT) -> dict:
    """Greedy answers to (image, question, expected_answer) items and how often the expected text
    appears in them (`mentions`: whole words, any case).

    Returns {"rate": percent, "hits", "total", "answers"}. Forget accuracy: items whose
    expected answer is the forgotten name; retain accuracy: items with their correct answers.
    A LlavaAdapter brings its own processor/tokenizer and prompt; a model needs them passed.
    """
    if isinstance(model_or_adapter, LlavaAdapter):
        adapter = model_or_adapter
    else:
        adapter = LlavaAdapter(model_or_adapter, processor=processor, tokenizer=tokenizer,
                               image_processor=image_processor, prompt=prompt)
    items = list(items)
    if not items:
        raise SlugError("no (image, question, expected_answer) items to evaluate")
    for item in items:  # refused before any generation
        if not isinstance(item, (tuple, list)) or len(item) != 3 or not isinstance(item[2], str) \
                or not item[2].strip():
            raise SlugError(f"each item is (image, question, expected_answer) with a non-empty answer; got "
                            f"{item!r:.80}")
    answers = generate_answers(adapter, items, max_new_tokens=max_new_tokens, batch_size=batch_size)
    hits = [mentions(a, item[2]) for a, item in zip(answers, items)]
    return {"rate": 100.0 * sum(hits) / len(items), "hits": sum(hits), "total": len(items), "answers": answers}
