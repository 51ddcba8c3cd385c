"""The built-in digits mini-CLIP: its training script learns, and the shipped weights load exactly."""
import torch

from slug_fast import digits


def test_a_short_training_run_learns(digits_trained):
    data = digits_trained[1]
    model = digits.train_digits_clip(seed=3, epochs=1, data=data)
    assert digits.zero_shot_accuracy(model, data.test_images, data.test_labels) > 40  # chance is 10
    again = digits.train_digits_clip(seed=3, epochs=1, data=data)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_shipped_weights_load_and_score_as_recorded():
    model, meta = digits.load_pretrained()
    data = digits.load_digits_data(int(meta["split_seed"]))
    top1 = digits.zero_shot_accuracy(model, data.test_images, data.test_labels)
    assert abs(top1 - float(meta["test_top1"])) < 1e-3 and top1 >= 90
    assert digits.PRETRAINED.stat().st_size < 2_000_000


def test_save_pretrained_round_trips_bit_exactly(digits_model, tmp_path):
    path = digits.save_pretrained(digits_model, tmp_path / "m.safetensors", seed=0, epochs=4)
    loaded, meta = digits.load_pretrained(path)
    assert meta["epochs"] == "4"
    assert all(torch.equal(a, b) for a, b in zip(digits_model.state_dict().values(), loaded.state_dict().values()))


def test_demo_accuracies_match_the_digits_own_zero_shot(digits_model, digits_trained, gen):
    """demo.accuracies runs slug_fast.eval's ZeroShotClassifier; the oracle is slug_fast.digits' own
    zero-shot code, the hits counted image by image; the demo task's cached path follows edits."""
    from slug_fast import LayerEdit
    from slug_fast.demo import DemoTask, accuracies

    data = digits_trained[1]
    task = DemoTask(digits_model, data, 3, [], [], {}, 0.0)

    def oracle(label):
        logits = digits.zero_shot_logits(digits_model, data.test_images, digits.class_text_features(digits_model))
        top = logits.argsort(dim=-1, descending=True, stable=True)[:, :5].tolist()
        labels = data.test_labels.tolist()
        out = {}
        for side, rows in (("forget", [i for i, y in enumerate(labels) if y == label]),
                           ("retain", [i for i, y in enumerate(labels) if y != label])):
            for k in (1, 5):
                out[f"{side}_top{k}"] = round(100.0 * sum(labels[i] in top[i][:k] for i in rows) / len(rows), 4)
        return out

    params = dict(digits_model.named_parameters())
    for name in (None, "visual.proj", "text_projection"):  # the original, then one edit in each tower
        with LayerEdit(digits_model, {name or "visual.proj": torch.randn(params[name or "visual.proj"].shape,
                                                                          generator=gen)}) as edit:
            edit.step(0.0 if name is None else 0.05)
            for label in (3, 7):
                expected = oracle(label)
                assert accuracies(digits_model, data, label) == expected, (name, label)
            assert task.accuracies() == oracle(3) and task.accuracies(digits.build_model(1)) != oracle(3)
