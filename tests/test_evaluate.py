"""Evaluation: plain vs label-masked mIoU on known predictors, and checkpoint errors."""

from pathlib import Path

import numpy as np
import pytest
import torch

from cosa.checkpoint import Checkpoint, save_checkpoint
from cosa.config import preset
from cosa.data import EvalDataset, open_dataset, write_synthetic_dataset
from cosa.errors import CheckpointError
from cosa.evaluation.evaluate import evaluate
from cosa.evaluation.predictors import image_to_tensor


@pytest.fixture(scope="module")
def val_index(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("eval") / "data"
    write_synthetic_dataset(root, 1, 3, 0, seed=2)
    return open_dataset(root, "val")


def _masks(index) -> dict[tuple[int, int, int], np.ndarray]:
    data = EvalDataset(index)
    return {data[i]["image"].shape: data[i]["mask"] for i in range(len(data))}


def test_perfect_predictor_scores_one(val_index) -> None:
    masks = _masks(val_index)
    k = len(val_index.class_names)

    def oracle(image: np.ndarray) -> np.ndarray:
        mask = masks[image.shape]
        return np.eye(k, dtype=np.float32)[np.where(mask == 255, 0, mask)].transpose(2, 0, 1)

    result = evaluate(oracle, val_index)
    assert result.miou == pytest.approx(1.0) and result.miou_label_masked == pytest.approx(1.0)
    assert result.num_images == 3 and result.split == "val"


def test_label_masking_removes_absent_class_errors(val_index) -> None:
    masks = _masks(val_index)
    k = len(val_index.class_names)
    present = {c for m in masks.values() for c in np.unique(m) if c not in (0, 255)}
    absent = next(c for c in range(1, k) if c not in present)

    def confused(image: np.ndarray) -> np.ndarray:
        mask = masks[image.shape]
        logits = np.eye(k, dtype=np.float32)[np.where(mask == 255, 0, mask)].transpose(2, 0, 1)
        logits[absent] = 2.0  # a class absent from the image label wins everywhere
        return logits

    result = evaluate(confused, val_index)
    assert result.miou < 0.2  # absent class everywhere
    assert result.miou_label_masked == pytest.approx(1.0)  # GT image labels hide the mistake
    assert result.per_class[val_index.class_names[absent]] == 0.0


def test_image_to_tensor_copies_read_only_arrays() -> None:
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    image.setflags(write=False)
    x = image_to_tensor(image, torch.device("cpu"))
    assert x.shape == (1, 3, 2, 3) and x.dtype == torch.float32
    assert x[0, :, 1, 2].tolist() == image[1, 2].tolist()


def test_class_mismatch_between_checkpoint_and_data(val_index, tmp_path: Path) -> None:
    from cosa.evaluation.run import evaluate_checkpoint

    ckpt = Checkpoint(
        config=preset("demo"),
        class_names=["background", "x"],
        palette=[[0, 0, 0]] * 2,
        iteration=0,
        online={},
        teacher={},
    )
    save_checkpoint(ckpt, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="classes"):
        evaluate_checkpoint(tmp_path / "c.pt", val_index.root, split="val", device="cpu")
