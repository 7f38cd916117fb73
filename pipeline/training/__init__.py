"""BVPO training: loss, sequence log-probabilities, reference pass and the trainer loop."""
