"""``della sweep``: merge a recipe over a grid or a random search of its parameters, score each
candidate with the user's command, and keep the best (README, "Finding the best merge").

``grid`` parses what varies, ``candidates`` makes a checked recipe of each setting and seed,
``runner`` merges and scores them over models opened once, ``batch`` merges as many at once as
the memory budget holds in one pass over the inputs, ``evaluate`` runs the user's command,
``results`` keeps the state and the table, ``plot`` draws score against each parameter.
"""
