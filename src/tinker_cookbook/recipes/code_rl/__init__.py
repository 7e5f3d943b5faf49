"""Code RL on HumanEval: the model writes a function, the sandbox runs the tests (see ``train``)."""
