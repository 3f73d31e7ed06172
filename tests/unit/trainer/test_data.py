"""Dataset: layout, resize/crop/flip/normalise, deterministic per-rank shards that resume exactly,
and each malformed input rejected with the file or row named (exit code EXIT_DATASET_ERROR)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_testlib import EXAMPLE_DATASET, write_dataset
from PIL import Image

from lorakube_api import contract
from lorakube_trainer.cli import run_cli
from lorakube_trainer.data import (CaptionedImages, DataPosition, DatasetError, SampleKey, ShardSampler,
                                   load_records, resize_and_crop)


def test_example_dataset_loads() -> None:
    records = load_records(EXAMPLE_DATASET)
    assert len(records) == 5 and all(r.path.is_file() and r.text for r in records)


def test_metadata_at_the_dataset_root_is_accepted(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "flat", [(32, 32), (40, 24)], layout="flat")
    records = load_records(root)
    assert [r.path.name for r in records] == ["img0.png", "img1.png"]
    assert records[1].text == "caption 1"


def test_resize_covers_then_center_crops_and_normalises() -> None:
    img = Image.new("RGB", (80, 40), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 40))          # blue left strip: cut away by a center crop
    out = resize_and_crop(img, 32, 32, center_crop=True, random_flip=False, rng=np.random.default_rng(0))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    red = torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 32, 32)
    assert torch.allclose(out, red, atol=1e-6)
    random = resize_and_crop(img, 32, 32, center_crop=False, random_flip=False, rng=np.random.default_rng(0))
    assert random.shape == (3, 32, 32)


def test_random_crop_and_flip_vary_with_the_rng_and_are_reproducible() -> None:
    img = Image.fromarray(np.arange(64 * 48 * 3, dtype=np.uint8).reshape(48, 64, 3) % 251)
    crops = {resize_and_crop(img, 32, 32, False, True, np.random.default_rng(s)).sum().item() for s in range(8)}
    assert len(crops) > 1
    a = resize_and_crop(img, 32, 32, False, True, np.random.default_rng(3))
    b = resize_and_crop(img, 32, 32, False, True, np.random.default_rng(3))
    assert torch.equal(a, b)


def test_flip_mirrors_horizontally() -> None:
    img = Image.new("RGB", (32, 32), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 4, 32))
    flipped = [resize_and_crop(img, 32, 32, True, True, np.random.default_rng(s)) for s in range(10)]
    left_white = {bool(f[0, 0, 0] > 0) for f in flipped}
    assert left_white == {True, False}               # some flipped, some not
    for f in flipped:
        assert bool(f[0, 0, 0] > 0) != bool(f[0, 0, -1] > 0)


def _dataset(records, per_epoch: int, seed: int = 1) -> CaptionedImages:
    return CaptionedImages(records, seed=seed, height=16, width=16, center_crop=False, random_flip=True,
                           samples_per_epoch=per_epoch)


def test_ranks_get_disjoint_shards_and_the_epoch_order_is_seeded(dataset: Path) -> None:
    records = load_records(dataset)
    world, batch, batches = 2, 2, 5
    ds = _dataset(records, batches * batch * world)
    keys = {r: list(ShardSampler(rank=r, world_size=world, batch_size=batch, batches_per_epoch=batches,
                                 max_epochs=1, start=DataPosition(0, 0))) for r in range(world)}
    positions = {r: {k.position for k in ks} for r, ks in keys.items()}
    assert not positions[0] & positions[1]
    assert positions[0] | positions[1] == set(range(batches * batch * world))
    first = [ds.record_index(k) for k in keys[0]]
    assert first == [_dataset(records, 20).record_index(k) for k in keys[0]]
    assert first != [_dataset(records, 20, seed=2).record_index(k) for k in keys[0]]
    # Shuffled passes: every record appears before any repeats.
    assert sorted(ds.record_index(SampleKey(0, p)) for p in range(5)) == list(range(5))


def test_sampler_resumes_with_exactly_the_next_samples() -> None:
    kwargs = dict(rank=1, world_size=2, batch_size=3, batches_per_epoch=4, max_epochs=3)
    full = list(ShardSampler(start=DataPosition(0, 0), **kwargs))
    start = DataPosition.after_optimizer_steps(steps=5, accumulate=2, steps_per_epoch=2)   # 4 batches/epoch
    assert start == DataPosition(epoch=2, batch_in_epoch=2)
    resumed = ShardSampler(start=start, **kwargs)
    assert list(resumed) == full[(2 * 4 + 2) * 3:]
    assert len(resumed) == len(list(resumed))


def test_items_are_pure_functions_of_the_key(dataset: Path) -> None:
    ds = _dataset(load_records(dataset), 20)
    torch.manual_seed(0)
    a = ds[SampleKey(1, 3)]
    torch.manual_seed(99)
    b = ds[SampleKey(1, 3)]
    assert torch.equal(a["pixels"], b["pixels"]) and a["text"] == b["text"]
    assert a["pixels"].shape == (3, 16, 16)


# --- errors -------------------------------------------------------------------------------------

def _write(root: Path, csv_text: str, images: dict[str, bytes | None] | None = None) -> Path:
    folder = root / "train"
    folder.mkdir(parents=True)
    (folder / "metadata.csv").write_text(csv_text)
    for name, data in (images or {}).items():
        if data is None:
            Image.new("RGB", (8, 8)).save(folder / name)
        else:
            (folder / name).write_bytes(data)
    return root


@pytest.mark.parametrize(("csv_text", "images", "expected"), [
    ("file,caption\na.png,x\n", {"a.png": None}, r"missing column\(s\) file_name; expected file_name and text "
                                                 r"or caption, found file,caption"),
    ("file_name,text\n", {}, "no rows"),
    ("file_name,text\na.png,x\nb.png,y\n", {"a.png": None}, r"row 3: image 'b.png' not found"),
    ("file_name,text\na.png,x\nbad.png,y\n", {"a.png": None, "bad.png": b"not an image"},
     r"row 3: bad.png is not a readable image"),
    ("file_name,text\n../escape.png,x\n", {}, "row 2: .*points outside the dataset folder"),
    ("file_name,text\n/etc/passwd,x\n", {}, "row 2: .*absolute path"),
    ("file_name,text\n,x\n", {}, "row 2: empty file_name"),
])
def test_malformed_datasets_name_the_file_or_row(tmp_path: Path, csv_text: str, images: dict, expected: str) -> None:
    root = _write(tmp_path / "ds", csv_text, images)
    with pytest.raises(DatasetError, match=expected):
        load_records(root)


def test_missing_metadata_names_the_expected_path(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"train/metadata.csv"):
        load_records(tmp_path / "empty")


def test_truncated_image_is_rejected(tmp_path: Path) -> None:
    root = _write(tmp_path / "ds", "file_name,text\nt.png,x\n")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(root / "train" / "t.png")
    data = (root / "train" / "t.png").read_bytes()
    (root / "train" / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="row 2: t.png"):
        load_records(root)


def test_oversized_images_are_refused_before_decoding(tmp_path: Path) -> None:
    root = _write(tmp_path / "ds", "file_name,text\nbig.png,x\n", {"big.png": None})
    Image.new("RGB", (300, 200)).save(root / "train" / "big.png")
    with pytest.raises(DatasetError, match=r"row 2: big.png is 300x200 = 60000 pixels, more than the limit of 50000"):
        load_records(root, max_pixels=50_000)


def test_cli_exits_with_the_dataset_error_code(tmp_path: Path, toy_model: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = _write(tmp_path / "ds", "file_name,text\nmissing.png,x\n")
    code = run_cli(["--model_family", "flux", "--model_path", str(toy_model), "--dataset_path", str(root),
                    "--output_path", str(tmp_path / "o"), "--height", "16", "--width", "16"])
    assert code == contract.EXIT_DATASET_ERROR
    assert "missing.png" in capsys.readouterr().err
