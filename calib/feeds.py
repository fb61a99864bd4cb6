"""What the mirror is fed during calibration: one window per run, or a window stepped through a KV cache.

A scoring graph takes a whole window at once. A KV-cache step graph (``onnxq export --kv-cache``)
takes a chunk of tokens plus the cache, so a window is run chunk after chunk with the cache the
previous chunks wrote, as at generation time: the observers see the cache and the attention over
it as they will be on the device.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from onnxq.core.steps import CacheShape, step_inputs


class WindowFeeds:
    """Each window is one run of a graph whose only input is ``name`` (the token ids)."""

    def __init__(self, name: str, windows: Sequence[np.ndarray] | np.ndarray) -> None:
        self.name = name
        self.windows = windows

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for w in self.windows:
            yield {self.name: torch.as_tensor(np.asarray(w, dtype=np.int64)).reshape(1, -1)}

    def update(self, outputs: Mapping[str, torch.Tensor]) -> None:
        """Nothing to carry from one window to the next."""

    def __len__(self) -> int:
        return len(self.windows)


class CacheFeeds:
    """Windows stepped through a KV cache: chunks of ``chunk`` tokens at increasing positions."""

    def __init__(
        self, windows: Sequence[np.ndarray] | np.ndarray, chunk: int, shape: CacheShape, mask_value: float
    ) -> None:
        self.windows = windows
        self.chunk = chunk
        self.shape = shape
        self.mask_value = mask_value
        self._outputs: Mapping[str, torch.Tensor] | None = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for w in self.windows:
            ids = np.asarray(w, dtype=np.int64).reshape(-1)[: self.shape.slots]
            cache = {k: torch.from_numpy(v) for k, v in self.shape.empty().items()}
            for pos in range(0, len(ids), self.chunk):
                part = ids[pos : pos + self.chunk]
                feeds = {
                    k: torch.from_numpy(v)
                    for k, v in step_inputs(part, pos, self.chunk, self.shape, self.mask_value).items()
                }
                self._outputs = None
                yield {**feeds, **cache}
                if self._outputs is None:
                    raise RuntimeError("CacheFeeds: update() was not called with the step's outputs")
                for name, slots in cache.items():
                    present = self._outputs[name.replace("past_", "present_")]
                    slots[:, :, pos : pos + len(part)] = present[:, :, : len(part)]

    def update(self, outputs: Mapping[str, torch.Tensor]) -> None:
        self._outputs = outputs

    def __len__(self) -> int:
        return sum(-(-min(len(w), self.shape.slots) // self.chunk) for w in self.windows)
