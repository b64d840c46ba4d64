"""The ground-truth mask view (fully supervised bound) follows the image views' geometry exactly."""

import numpy as np
import torch
from PIL import Image

from cosa.data.transforms import ViewParams, apply_view_params, denormalize, mask_view


def test_mask_view_is_aligned_with_the_weak_view() -> None:
    ids = np.zeros((40, 60), np.uint8)
    ids[:, 30:] = 1  # right half class 1
    ids[:20, :10] = 2  # top-left block class 2
    colours = np.array([[0, 0, 0], [200, 0, 0], [0, 200, 0]], np.uint8)
    image = Image.fromarray(colours[ids])
    params = ViewParams(
        scale=1.0,
        size=(40, 60),
        flip=True,
        pad_top=4,
        pad_left=0,
        crop_top=0,
        crop_left=10,
        blur_radius=None,
        strong_op="identity",
        magnitude=1,
    )
    views = apply_view_params(image, 48, params)
    mask = mask_view(ids, 48, params)
    assert mask.shape == (48, 48) and mask.dtype == torch.int64
    h0, h1, w0, w1 = views.img_box.tolist()
    assert (mask[:h0] == 255).all() and (mask[h1:] == 255).all()
    rgb = denormalize(views.weak).round().permute(1, 2, 0).numpy()[h0:h1, w0:w1]
    expected = colours[mask[h0:h1, w0:w1].numpy()]
    assert np.abs(rgb - expected).max() <= 2  # nearest vs bilinear agree on flat regions at scale 1
