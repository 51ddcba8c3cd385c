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
