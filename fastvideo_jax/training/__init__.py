"""Training: preprocessed latent datasets (``data``), preprocessing (``preprocess``), and the training loop."""
