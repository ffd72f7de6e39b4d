"""Inference: models + LR images + settings -> SR images, shared by ``infer`` and ``ablate``.

``predict`` (settings, the streaming prediction loop, which models a config asks for), ``tiling``
(pad, cut overlapping 2-D / 3-D tiles, run them in batches, merge with weights), ``ensemble`` (the
dihedral self-ensemble and the merge of several models), ``windows`` (several tile/stride windows per
image merged, and ``tile=auto``).
"""
