"""Job backends: where the agent's jobs come from.

  native  the native registry (SQLite + the cgroups the agent makes), fed by `adoptctl`
"""
