"""Evaluation: plain vs label-masked mIoU on known predictors, and checkpoint errors."""

from pathlib import Path

import numpy as np
import pytest
import torch

from cosa.checkpoint import Checkpoint, save_checkpoint
from cosa.config import preset
from cosa.data import EvalDataset, open_dataset, write_synthetic_dataset
from cosa.errors import DataError
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
    with pytest.raises(DataError, match="predicts 2 classes .* has 11 .* the model was trained on"):
        evaluate_checkpoint(tmp_path / "c.pt", val_index.root, split="val", device="cpu")


class _ScriptedNet(torch.nn.Module):
    """A 'network' whose CAM is the GT mask (one-hot on the 16x16 grid would be too coarse, so it
    works at input resolution) and whose classifier says every class in `claimed` is present."""

    def __init__(self, mask: np.ndarray, num_classes: int, claimed: list[int]) -> None:
        super().__init__()
        self.mask = torch.from_numpy(mask.astype(np.int64))
        self.num_classes = num_classes
        self.claimed = claimed

    def forward(self, x: torch.Tensor):
        from cosa.model.outputs import NetOutput

        batch, _, height, width = x.shape
        mask = torch.nn.functional.interpolate(
            self.mask[None, None].float(), size=(height, width), mode="nearest"
        )[0, 0].long()
        cam = torch.stack([(mask == c + 1).float() for c in range(self.num_classes)])
        cam = cam[None].expand(batch, -1, -1, -1).clone()
        if x.shape[0] == 2 * 1:  # the flipped half of the teacher's batch: flip back the content
            cam[1] = cam[1].flip(-1)
        logits = torch.full((batch, self.num_classes), -10.0)
        logits[:, self.claimed] = 10.0
        seg = torch.zeros(batch, self.num_classes + 1, height, width)
        return NetOutput(logits, logits, cam, cam, seg, torch.zeros(batch, 4, height, width))


def test_cam_quality_scores_gt_and_predicted_labels_separately(val_index) -> None:
    """With a perfect CAM, GT labels give CAM mIoU 1; a classifier that claims a wrong class as
    well (or misses the true one) costs only the predicted-label score."""
    from cosa.evaluation.evaluate import CamQuality

    item = EvalDataset(val_index)[0]
    mask = item["mask"]
    present = [c for c in range(len(item["label"])) if item["label"][c] > 0]
    absent = next(c for c in range(len(item["label"])) if item["label"][c] == 0)
    num_classes = len(item["label"])

    def score(claimed: list[int]) -> tuple[float, float]:
        net = _ScriptedNet(mask, num_classes, claimed)
        quality = CamQuality(net, torch.device("cpu"), num_classes + 1, (1.0,), 0.25, 0.7, True)
        quality.update(item["image"], mask, item["label"])
        return quality.cam_matrix.scores().miou, quality.cam_predicted_matrix.scores().miou

    assert score(present) == pytest.approx((1.0, 1.0))
    gt_only, missing = score(present[1:])  # the classifier misses the first present class
    assert gt_only == pytest.approx(1.0) and missing < 1.0
    with_extra = score(present + [absent])  # the extra class has an empty CAM: no pixel changes
    assert with_extra == pytest.approx((1.0, 1.0))


def _random_net(num_classes: int):
    from cosa.config import apply_overrides
    from cosa.model import build_model

    cfg = apply_overrides(preset("demo"), {"model.decoder_channels": 16})
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, num_classes=num_classes, load_pretrained=False).eval()


def test_native_multiscale_single_pass_equals_the_deploy_forward() -> None:
    """At scale 1.0 without flip, on a size the deploy forward does not resize, both predictors
    run the same network on the same pixels: equal logits."""
    from cosa.evaluation.predictors import DeployPredictor, NativeMultiScalePredictor

    _, net = _random_net(3)
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    deploy = DeployPredictor(net, torch.device("cpu"))(image)
    single = NativeMultiScalePredictor(net, torch.device("cpu"), (1.0,), flip=False)(image)
    assert single.shape == deploy.shape == (4, 64, 96)
    np.testing.assert_allclose(single, deploy, atol=1e-4)


def test_native_multiscale_with_flip_is_flip_equivariant() -> None:
    """Summing f(x) and flip(f(flip(x))) makes the prediction of a mirrored image the mirrored
    prediction, at any size; without the flip a random network is not equivariant."""
    from cosa.evaluation.predictors import NativeMultiScalePredictor

    _, net = _random_net(3)
    image = np.random.default_rng(1).integers(0, 256, (61, 83, 3), dtype=np.uint8)
    mirrored = np.ascontiguousarray(image[:, ::-1])
    tta = NativeMultiScalePredictor(net, torch.device("cpu"), (1.0, 1.5), flip=True)
    logits = tta(image)
    assert logits.shape == (4, 61, 83)
    np.testing.assert_allclose(tta(mirrored), logits[:, :, ::-1], atol=1e-3)
    plain = NativeMultiScalePredictor(net, torch.device("cpu"), (1.0, 1.5), flip=False)
    assert np.abs(plain(mirrored) - plain(image)[:, :, ::-1]).max() > 1e-2


@pytest.fixture(scope="module")
def random_checkpoint(val_index, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of a randomly initialised demo network whose teacher reads scales 1.0, 1.5."""
    from cosa.config import apply_overrides

    cfg, net = _random_net(len(val_index.class_names) - 1)
    cfg = apply_overrides(cfg, {"pseudo.scales": [1.0, 1.5]})
    state = net.state_dict()
    names = list(val_index.class_names)
    path = tmp_path_factory.mktemp("ckpt") / "c.pt"
    save_checkpoint(Checkpoint(cfg, names, [[0, 0, 0]] * len(names), 0, state, state), path)
    return path


def test_tta_protocol_scores_the_cam_with_its_own_scales(val_index, random_checkpoint) -> None:
    """deploy and paper score the CAM with the checkpoint's teacher scales + flip; tta with the
    scales and flip it is given, so a CAM-only model can be compared at matched augmentation."""
    from cosa.evaluation.run import evaluate_checkpoint

    def score(**kwargs):
        return evaluate_checkpoint(random_checkpoint, val_index.root, device="cpu", **kwargs)

    deploy = score()
    teacher = score(protocol="tta", scales=(1.0, 1.5), flip=True)
    single = score(protocol="tta", scales=(1.0,), flip=False)
    assert deploy.protocol == "deploy" and teacher.protocol == "tta"
    assert teacher.cam_miou == pytest.approx(deploy.cam_miou)
    assert teacher.cpl_coverage == pytest.approx(deploy.cpl_coverage)
    assert single.cpl_coverage != pytest.approx(deploy.cpl_coverage)


def test_cli_eval_tta_prints_one_json_object(val_index, random_checkpoint) -> None:
    import json

    from typer.testing import CliRunner

    from cli import app

    args = ["eval", str(random_checkpoint), "--data", str(val_index.root), "--json"]
    tta = ["--protocol", "tta", "--scales", "1.0", "--no-flip", "--max-images", "2"]
    res = CliRunner().invoke(app, args + tta)
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    assert result["protocol"] == "tta" and result["num_images"] == 2
    assert 0.0 <= result["miou"] <= 1.0 and 0.0 <= result["cam_miou"] <= 1.0
    res = CliRunner().invoke(app, args + ["--protocol", "tta", "--scales", "1.0,x"])
    assert res.exit_code == 2 and "--scales" in res.output


def test_eval_warns_when_it_scores_the_split_that_selected_the_checkpoint(tmp_path: Path) -> None:
    from dataclasses import replace

    from cosa.evaluation.run import selection_warning

    cfg = preset("demo")
    selected = {"selection_metric": "miou", "selection_split": "val", "best_iteration": 800}
    best = Checkpoint(cfg, ["background", "x"], [[0, 0, 0]] * 2, 800, {}, {}, metrics=selected)
    warning = selection_warning(best, tmp_path, "val")
    assert warning is not None and "'val' chose this checkpoint" in warning
    assert selection_warning(best, tmp_path, "test") is None
    assert selection_warning(replace(best, iteration=600), tmp_path, "val") is None  # last.pt
    elsewhere = replace(best, config=replace(cfg, data=replace(cfg.data, root=str(tmp_path))))
    assert selection_warning(elsewhere, tmp_path / "other", "val") is None
    assert selection_warning(elsewhere, tmp_path, "val") is not None


def test_cli_eval_prints_the_selection_warning(val_index, random_checkpoint, monkeypatch) -> None:
    from typer.testing import CliRunner

    import cosa.evaluation.run
    from cli import app

    real = cosa.evaluation.run.evaluate_checkpoint

    def scored(*args, **kwargs):
        result = real(*args, **kwargs)
        result.extra["warnings"] = ["split 'val' chose this checkpoint"]
        return result

    monkeypatch.setattr(cosa.evaluation.run, "evaluate_checkpoint", scored)
    args = ["eval", str(random_checkpoint), "--data", str(val_index.root), "--no-cam"]
    res = CliRunner().invoke(app, [*args, "--max-images", "1", "--device", "cpu"])
    assert res.exit_code == 0 and "warning: split 'val' chose this checkpoint" in res.output
