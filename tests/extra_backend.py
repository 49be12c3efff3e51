"""A fourth backend, written as a user would: one module, one registration, nothing else touched.

It serves the reference's decode (PIL) with another resampler (nearest neighbour), so its
pixels differ from the reference's while order, crops and batching must not.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from fastload.pipelines.base import Backend
from fastload.pipelines.sampling import FLIP, H, LEFT, OUT_H, OUT_W, TOP, W, X0, Y0, plan_batches


class NearestBackend(Backend):
    name = "nearest"

    def run_epoch(self, order, params):
        th, tw = self.spec.size
        for index, rows in plan_batches(order, params, self.options.batch_size, self.options.drop_last):
            out = torch.zeros((len(index), th, tw, 3), dtype=torch.uint8)
            for k, (i, p) in enumerate(zip(index, rows)):
                im = self.reader.image(int(i)).crop((p[X0], p[Y0], p[X0] + p[W], p[Y0] + p[H]))
                im = np.asarray(im.resize((int(p[OUT_W]), int(p[OUT_H])), Image.NEAREST))
                window = im[max(0, p[TOP]):p[TOP] + th, max(0, p[LEFT]):p[LEFT] + tw]
                out[k, :window.shape[0], :window.shape[1]] = torch.from_numpy(np.array(window))
                if p[FLIP]:
                    out[k] = out[k].flip(1)
            yield out, index
