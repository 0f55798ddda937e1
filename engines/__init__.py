"""The RadFinder model: architecture, losses, training, evaluation, export, runtimes."""
