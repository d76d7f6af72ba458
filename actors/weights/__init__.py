"""Weights: the policy's parameters as flat buffers, and versioned payloads to move them.

``flat.py`` ``FlatParams``, ``weights_digest``; ``payload.py`` ``Payload`` and the
coordinator's ``WeightStore`` (torch-free); ``object_store.py`` publisher/receiver over
Ray's object store (the version invariant is
written at its top); ``collective.py`` the ranks of a ``torch.distributed``
broadcast (its invariant extends the object store's). The driver-side policy
(when to use which, fallback, newcomers) is ``learner/driver/weight_sync.py``.
Imports torch and numpy only (``payload.py`` not even those): the object store's two Ray calls (``put``,
``fetch``) are ``actors/runtime/object_store.py``, handed in by the actors.
"""
