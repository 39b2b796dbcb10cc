"""Core layer: the maths of refinement as a Markov chain (theory, belief, model, question types, policies,
statistics, validation). numpy and scipy only; nothing here imports DSPy."""
