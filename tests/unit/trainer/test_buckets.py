"""Aspect-ratio buckets: the shapes, which image goes where, one shape per micro-batch, disjoint
shards across ranks, and a real run on mixed shapes that crops nothing square and resumes exactly."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from PIL import Image
from toy_family import ToyFamily
from trainer_testlib import assert_toy_run_resumes_bit_identically

from lorakube_api import contract
from lorakube_trainer import buckets
from lorakube_trainer.data import CaptionedImages, DataPosition, Record, SampleKey, ShardSampler
from lorakube_trainer.train import run


@pytest.mark.parametrize("multiple", [16, 64])
def test_bucket_shapes_keep_the_area_and_the_size_multiple(multiple: int) -> None:
    shapes = buckets.bucket_shapes(1024, 1024, multiple)
    assert (1024, 1024) in shapes
    for h, w in shapes:
        assert h % multiple == 0 and w % multiple == 0
        assert h * w <= 1024 * 1024
        assert max(h, w) / min(h, w) <= buckets.MAX_ASPECT
    assert len({round(w / h, 6) for h, w in shapes}) == len(shapes)       # one shape per aspect ratio
    # Mirror images: every landscape bucket has its portrait twin.
    assert {(w, h) for h, w in shapes} == set(shapes)


def test_an_image_goes_to_the_bucket_nearest_its_aspect_ratio() -> None:
    shapes = buckets.bucket_shapes(1024, 1024, 16)
    h, w = shapes[buckets.nearest_bucket(1080, 1920, shapes)]            # a 16:9 photo
    assert abs(math.log((w / h) / (16 / 9))) < 0.02 and h * w >= 0.9 * 1024 * 1024
    h, w = shapes[buckets.nearest_bucket(1920, 1080, shapes)]            # and its portrait
    assert abs(math.log((h / w) / (16 / 9))) < 0.02
    assert shapes[buckets.nearest_bucket(500, 500, shapes)] == (1024, 1024)
    h, w = shapes[buckets.nearest_bucket(100, 1000, shapes)]             # 10:1 goes to the widest bucket
    assert w / h == max(sw / sh for sh, sw in shapes)


def _records(sizes: list[tuple[int, int]]) -> list[Record]:
    return [Record(path=Path(f"img{i}.png"), text=f"caption {i}") for i in range(len(sizes))]


@pytest.mark.parametrize(("world", "batch"), [(1, 2), (2, 2), (2, 3), (4, 1)])
def test_every_micro_batch_holds_one_size_and_ranks_are_disjoint(world: int, batch: int) -> None:
    # 7 tall, 5 wide, 3 square images: no bucket divides evenly into batches.
    sizes = [(32, 16)] * 7 + [(16, 32)] * 5 + [(24, 24)] * 3
    batches_per_rank = 4
    length = batches_per_rank * batch * world
    ds = CaptionedImages(_records(sizes), seed=3, height=24, width=24, center_crop=True, random_flip=False,
                         samples_per_epoch=length, sizes=sizes, batch_size=batch, world_size=world)
    for rank in range(world):
        keys = list(ShardSampler(rank=rank, world_size=world, batch_size=batch, batches_per_epoch=batches_per_rank,
                                 max_epochs=1, start=DataPosition(0, 0)))
        for start in range(0, len(keys), batch):
            indices = [ds.record_index(k) for k in keys[start:start + batch]]
            assert len({sizes[i] for i in indices}) == 1, (rank, indices)
    order = buckets.bucketed_epoch_order(3, 0, sizes, length, batch, world)
    assert order.tolist() == [ds.record_index(SampleKey(0, p)) for p in range(length)]
    assert buckets.bucketed_epoch_order(3, 0, sizes, length, batch, world).tolist() == order.tolist()
    assert buckets.bucketed_epoch_order(3, 1, sizes, length, batch, world).tolist() != order.tolist()


def test_one_pass_shows_every_image_once_before_repeating() -> None:
    sizes = [(32, 16)] * 4 + [(16, 32)] * 4
    order = buckets.bucketed_epoch_order(0, 0, sizes, 8, 2, 2)
    assert sorted(order.tolist()) == list(range(8))


def _mixed_dataset(root: Path) -> Path:
    """Landscape, portrait and square images, each a different colour."""
    folder = root / "train"
    folder.mkdir(parents=True)
    shapes = [(64, 32), (64, 32), (32, 64), (32, 64), (40, 40), (40, 40), (96, 24), (24, 96)]
    lines = ["file_name,text"]
    for i, (w, h) in enumerate(shapes):
        Image.new("RGB", (w, h), (30 * i, 200 - 20 * i, 90)).save(folder / f"img{i}.png")
        lines.append(f"img{i}.png,caption {i}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def test_a_run_on_mixed_shapes_trains_each_image_in_its_bucket(make_cfg, tmp_path: Path) -> None:
    data = _mixed_dataset(tmp_path / "mixed")
    family = ToyFamily()
    cfg = make_cfg("--aspect_ratio_buckets", "--height", "32", "--width", "32", "--batch_size", "2",
                   "--max_epochs", "2", "--checkpoint_every_n_steps", "0", "--output_formats", "diffusers")
    cfg = dataclasses.replace(cfg, dataset_path=str(data))
    run(cfg, env={}, family=family)
    shapes = {shape[2:] for shape in family.batch_shapes}
    assert all(shape[0] == 2 for shape in family.batch_shapes)      # whole batches, one tensor each
    assert (16, 48) in shapes and (48, 16) in shapes                 # landscape and portrait, not squared
    assert (32, 32) in shapes
    for h, w in shapes:
        assert h % 16 == 0 and w % 16 == 0 and h * w <= 32 * 32


@pytest.mark.parametrize("extra", [(), ("--cache_latents", "--center_crop")])
def test_an_interrupted_bucketed_run_resumes_bit_identically(make_cfg, tmp_path: Path, extra: tuple) -> None:
    data = _mixed_dataset(tmp_path / "mixed")
    args = (*extra, "--aspect_ratio_buckets", "--height", "32", "--width", "32", "--batch_size", "2",
            "--random_flip", "--max_epochs", "2", "--checkpoint_every_n_steps", "2", "--output_formats", "diffusers")

    def cfg_for(out: str):
        cfg = make_cfg(*args, output=tmp_path / out)
        return dataclasses.replace(cfg, dataset_path=str(data))

    whole = run(cfg_for("whole"), env={}, family=ToyFamily())
    resumed = assert_toy_run_resumes_bit_identically(whole, cfg_for("whole"), cfg_for("cut"), crash_step=5)
    assert resumed.steps_done == whole.steps_done == 8
    losses = [json.loads(x)["loss"] for x in (tmp_path / "cut" / contract.ARTIFACT_METRICS).read_text().splitlines()]
    assert len(losses) == 8


def test_repeat_counts_weight_the_bucketed_order() -> None:
    """kohya folders' repeat counts: a record repeated 3 times fills its bucket's batches 3 times a pass."""
    records = [Record(path=Path("a.png"), text="a", repeats=3), Record(path=Path("b.png"), text="b"),
               Record(path=Path("c.png"), text="c"), Record(path=Path("d.png"), text="d")]
    sizes = [(32, 16), (32, 16), (16, 32), (16, 32)]
    # 3 + 1 tall slots and 2 wide ones: 3 batches of 2, one pass.
    ds = CaptionedImages(records, seed=5, height=24, width=24, center_crop=True, random_flip=False,
                         samples_per_epoch=6, sizes=sizes, batch_size=2, world_size=1)
    drawn = [ds.record_index(SampleKey(0, p)) for p in range(6)]
    assert sorted(drawn) == [0, 0, 0, 1, 2, 3]
    for start in range(0, 6, 2):
        assert len({sizes[i] for i in drawn[start:start + 2]}) == 1
