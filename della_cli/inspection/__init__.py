"""``della inspect``: how a recipe's task vectors relate, per tensor group and layer.

``run`` streams the models and aggregates, ``stats`` holds the per-tensor sums and their math,
``select`` the exact top-d cuts found from row blocks, ``table`` and ``picture`` the outputs.
"""
