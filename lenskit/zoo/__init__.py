"""The zoo: small models trained by lenskit's own scripts on synthetic data, to ship with the package.

Modules: `tokenizer` (word-level tokenizer), `data` (training and held-out data), `train`
(``python -m lenskit.zoo.train NAME``), `evaluate` (``python -m lenskit.zoo.evaluate NAME``).
Trained checkpoints go to ``checkpoints/NAME/`` (lenskit's folder format, a README.md model
card and train_log.csv), where ``lenskit.load("lenskit/NAME")`` finds them.
"""

DEFAULT_MODEL = "lenskit/ioi-4l"
"""The zoo model that the main job and the reproductions use when no model is named."""
