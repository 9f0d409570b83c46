"""A fitted scikit-learn random forest held as tensors, so that a fused model keeps it in its checkpoint.

The fusion's handcrafted half (``model.fusion: radiomics_vote``) is the soft vote of the two radiomics
baselines, the logistic regression and the random forest (:func:`vote_logits`). A fused model must
live in its own checkpoint and ONNX file, with nothing pickled beside it, so the forest is stored as
buffers: per tree and node the split feature, the threshold, the two children and the class
fractions. All trees are walked at once, one level per step, with gathers and a select, which export
to ONNX as they are.

Hummingbird-ml converts forests to torch in general, but it pins ``onnx <= 1.16.1`` (we need newer),
and skl2onnx gives an ONNX graph, not a torch module for the checkpoint and Grad-CAM. So the walk is
written here, and checked against the forest's own ``predict_proba`` (``tests/test_forest.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


class TreeEnsemble(nn.Module):
    """The class probabilities of a fitted ``RandomForestClassifier``: the mean over its trees.

    Args:
        n_trees, n_nodes, n_classes: Its size (``n_nodes``: the largest tree's node count; smaller
            trees are padded). :meth:`from_sklearn` builds a filled one; ``load_state_dict`` fills
            an empty one of the same size (``model.load_checkpoint``).

    Input: features ``(B, F)`` as the forest was fitted on them (imputed, not standardised).
    """

    def __init__(self, n_trees: int, n_nodes: int, n_classes: int):
        super().__init__()
        shape = (n_trees, n_nodes)
        # left / right hold flat node indices (tree * n_nodes + node); a leaf's children are the leaf
        # itself, so a walk that reaches a leaf early stays there for the remaining levels
        self.register_buffer("feature", torch.zeros(shape, dtype=torch.long))
        self.register_buffer("threshold", torch.zeros(shape))
        self.register_buffer("left", torch.arange(n_trees * n_nodes).view(shape))
        self.register_buffer("right", torch.arange(n_trees * n_nodes).view(shape))
        self.register_buffer("value", torch.zeros(*shape, n_classes))
        self.register_buffer("depth", torch.zeros((), dtype=torch.long))
        self.levels = 0  # the walk's length, a plain int so that export unrolls it
        self.register_load_state_dict_post_hook(TreeEnsemble._after_load)

    def _set_levels(self) -> None:
        self.levels = int(self.depth)

    @staticmethod
    def _after_load(module: TreeEnsemble, _keys) -> None:  # a named function: the module stays picklable
        module._set_levels()

    @classmethod
    def from_sklearn(cls, forest, n_classes: int) -> TreeEnsemble:
        """From a fitted ``RandomForestClassifier`` whose classes are codes in ``range(n_classes)``
        (a class absent from its training data gets probability 0)."""
        trees = [e.tree_ for e in forest.estimators_]
        n = max(t.node_count for t in trees)
        out = cls(len(trees), n, n_classes)
        feature = np.zeros((len(trees), n), np.int64)
        threshold = np.zeros((len(trees), n), np.float32)
        left = np.tile(np.arange(n), (len(trees), 1))
        right = left.copy()
        value = np.zeros((len(trees), n, n_classes), np.float32)
        cols = np.asarray(forest.classes_, dtype=np.int64)
        for i, t in enumerate(trees):
            m = t.node_count
            leaf = t.children_left < 0
            own = np.arange(m)
            feature[i, :m] = np.where(leaf, 0, t.feature)
            threshold[i, :m] = _float32_at_or_below(t.threshold)
            left[i, :m] = np.where(leaf, own, t.children_left)
            right[i, :m] = np.where(leaf, own, t.children_right)
            v = t.value[:, 0, :].astype(np.float64)
            value[i, :m][:, cols] = v / np.maximum(v.sum(1, keepdims=True), 1e-300)
        offset = (np.arange(len(trees)) * n)[:, None]
        with torch.no_grad():
            out.feature.copy_(torch.from_numpy(feature))
            out.threshold.copy_(torch.from_numpy(threshold))
            out.left.copy_(torch.from_numpy(left + offset))
            out.right.copy_(torch.from_numpy(right + offset))
            out.value.copy_(torch.from_numpy(value))
            out.depth.fill_(max(e.get_depth() for e in forest.estimators_))
        out._set_levels()
        return out

    @staticmethod
    def size_in(state_dict: dict[str, Tensor], prefix: str) -> tuple[int, int, int] | None:
        """``(n_trees, n_nodes, n_classes)`` of the forest stored under ``prefix`` (None: none there)."""
        value = state_dict.get(prefix + "value")
        return None if value is None or value.dim() != 3 else tuple(int(d) for d in value.shape)

    def damage(self, n_features: int) -> str | None:
        """What makes this forest unusable on ``n_features`` inputs (an edited or damaged file), or None."""
        n_flat = self.feature.numel()
        if n_flat and not (0 <= int(self.feature.min()) and int(self.feature.max()) < n_features):
            return f"its forest splits on a feature outside the {n_features} the model reads"
        for name in ("left", "right"):
            child = getattr(self, name)
            if child.numel() and not (0 <= int(child.min()) and int(child.max()) < n_flat):
                return f"its forest points to a node that does not exist ({name})"
        if not 0 <= self.levels <= self.feature.shape[1]:
            return f"its forest's depth {self.levels} does not fit its {self.feature.shape[1]} nodes per tree"
        return None

    def forward(self, x: Tensor) -> Tensor:
        n_trees, n_nodes = self.feature.shape
        feature, threshold = self.feature.view(-1), self.threshold.view(-1)
        left, right = self.left.view(-1), self.right.view(-1)
        x = x.float()
        node = (torch.arange(n_trees, device=x.device) * n_nodes).expand(x.shape[0], -1)
        for _ in range(self.levels):
            go_left = x.gather(1, feature[node]) <= threshold[node]
            node = torch.where(go_left, left[node], right[node])
        return self.value.view(n_trees * n_nodes, -1)[node].mean(1)


def _float32_at_or_below(threshold: np.ndarray) -> np.ndarray:
    """The largest float32 at or below each threshold: scikit-learn compares float32 features with
    float64 thresholds, and ``x <= t`` then holds exactly when ``x <= t32`` in float32."""
    t = np.asarray(threshold, np.float64)
    t32 = t.astype(np.float32)
    above = t32.astype(np.float64) > t
    t32[above] = np.nextafter(t32[above], np.float32(-np.inf))
    return t32


def vote_logits(lr_logits: Tensor, forest_probs: Tensor | None) -> Tensor:
    """The handcrafted half's logits: the soft vote (mean of the class probabilities) of the logistic
    regression and the forest, as log-probabilities; the logistic regression alone without a forest."""
    if forest_probs is None:
        return lr_logits
    p = (torch.softmax(lr_logits, dim=1) + forest_probs.to(lr_logits.dtype)) / 2
    return torch.log(p.clamp_min(1e-12))
