"""The two Ray calls of the object-store weight path, handed to the plain workers.

``put`` stores one wire array (``WeightPublisher.publish(put)``); ``fetch`` maps
a payload's refs to the arrays (``WeightReceiver.apply(payload, fetch)``).
Readers on a node map the one plasma copy; no private copy is made here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray


def put(array: np.ndarray) -> ray.ObjectRef:
    return ray.put(array)


def fetch(refs: dict[str, Any]) -> dict[str, Any]:
    return dict(zip(refs, ray.get(list(refs.values()))))
