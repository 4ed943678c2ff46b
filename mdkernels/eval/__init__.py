"""Evaluation as the papers compute it: verification ``.bin`` sets, IJB-B/IJB-C, identification against
distractors (``mdk eval``). Never imports the training loop."""
