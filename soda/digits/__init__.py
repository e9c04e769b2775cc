"""The project's own small model: a class-conditional DiT trained on scikit-learn's digits."""
