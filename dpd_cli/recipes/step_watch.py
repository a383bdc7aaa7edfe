"""The signatures of too large an image step, warned about once each (docs/guide.md, "Too large an image step").

The median matching loss of iterations 2..K+1 above ``LOSS_RISE`` times iteration 1's (the loss of the real
images, before any update; the median rides out the noise of the expert and start epoch each iteration draws),
and the images' std above ``STD_GROWTH`` times the initial images'.
"""

from __future__ import annotations

import statistics

__all__ = ["StepWatch"]

RISE_K, LOSS_RISE, STD_GROWTH = 5, 1.5, 5.0


class StepWatch:
    """Watches one run's iterations, in order. ``warnings`` (``{"kind", "iteration", "message"}``, kept in the
    run's files) holds the warnings given so far, a resumed run's included: each kind is given once."""

    def __init__(self, image_std0: float):
        self.image_std0 = image_std0  # the initial images' std
        self.warnings: list[dict] = []
        self.early: list[float] = []  # the losses of iterations 1..K+1

    def check(self, it: int, loss: float, image_std: float, lr_img: float) -> list[str]:
        """The new warnings of iteration ``it`` (run at image step ``lr_img``)."""
        early, found = self.early, {}
        if it == len(early) + 1 <= RISE_K + 1:  # iterations 1..K+1, run in order by this process
            early.append(loss)
        if it == RISE_K + 1 == len(early) and (rise := statistics.median(early[1:])) > LOSS_RISE * early[0]:
            found["loss"] = (
                f"the matching loss rose: median {rise:.4g} over iterations 2-{it}, against {early[0]:.4g} at "
                "iteration 1 (the real images)"
            )
        if image_std > STD_GROWTH * self.image_std0:
            found["image_scale"] = (
                f"the images' scale exploded: their std is {image_std:.4g}, {image_std / self.image_std0:.1f}x the "
                f"initial images' {self.image_std0:.4g}"
            )
        texts = []
        for kind, what in found.items():
            if kind not in {w["kind"] for w in self.warnings}:
                texts.append(
                    f"Iteration {it}: {what}. The signature of too large an image step: try a smaller --lr-img "
                    f"(e.g. {lr_img / 10:g}, a tenth of {lr_img:g}); `dpd evaluate --baseline init` tells whether "
                    "it helped."
                )
                self.warnings.append({"kind": kind, "iteration": it, "message": texts[-1]})
        return texts
