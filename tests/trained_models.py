"""Test models trained once per process (a module of its own: pytest executes conftest.py again
for every session it starts in a process, but imports other modules once)."""
import functools
import os


def trained_once(train):
    """`train()` computed once per process and shared (the caller copies what it changes).

    With SLUG_FAST_WARM_FIXTURES=1 it is computed when the module defining it is imported: a mutation run
    (bench/mutation.md) imports the tests once in mutmut's fork server, so every mutant's forked
    test run starts with the models trained instead of training them again. `train` must use no
    code that mutmut mutates (the training of a test model is set-up, not what is tested).
    """
    once = functools.lru_cache(maxsize=None)(train)
    if os.environ.get("SLUG_FAST_WARM_FIXTURES") == "1":
        once()
    return once


TEST_EPOCHS = 4  # a short training run of the built-in digits mini-CLIP


@trained_once
def trained_digits():
    from slug_fast import digits

    data = digits.load_digits_data(0)
    model = digits.train_digits_clip(seed=0, epochs=TEST_EPOCHS, data=data)
    return model.state_dict(), data
