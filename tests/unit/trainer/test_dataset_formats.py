"""The dataset formats users already have (metadata.csv, metadata.jsonl, image + .txt, kohya's
<repeats>_<name> folders), caption dropout and the default caption, and hostile datasets refused
by the trainer's preflight before torch loads: exit code 65, the file or row named, nothing written.
Every dataset here is generated in tmp_path."""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from toy_family import ToyFamily
from trainer_testlib import assert_toy_run_resumes_bit_identically

from lorakube_api import contract
from lorakube_trainer.caching import CachedCaptions, build_cache, empty_caption_file
from lorakube_trainer.cli import run_cli
from lorakube_trainer.config import ConfigError, parse_config
from lorakube_trainer.data import CaptionedImages, SampleKey
from lorakube_trainer.dataset_layout import DatasetError, find_dataset, load_records
from lorakube_trainer.train import run


def png(path: Path, size: tuple[int, int] = (16, 16), colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def jpeg_bytes(size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype("uint8")).save(buf, "JPEG")
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header declares width x height pixels: decoding it would allocate them."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def csv_dataset(root: Path, rows: list[str], images: tuple[str, ...] = ("a.png",),
                header: str = "file_name,text") -> Path:
    for name in images:
        png(root / "train" / name)
    (root / "train" / "metadata.csv").write_text("\n".join([header, *rows]) + "\n")
    return root


def jsonl_dataset(root: Path, lines: list[object], images: tuple[str, ...] = ("a.png",)) -> Path:
    for name in images:
        png(root / name)
    (root / "metadata.jsonl").write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return root


def txt_dataset(root: Path, captions: dict[str, str | None]) -> Path:
    """image name -> caption (None: no .txt beside it)."""
    for i, (name, caption) in enumerate(captions.items()):
        png(root / name, colour=(40 * i % 256, 90, 200))
        if caption is not None:
            (root / name).with_suffix(".txt").write_text(caption)
    return root


# --- each format read ----------------------------------------------------------------------------

def test_csv_the_original_layout_and_a_caption_column(tmp_path: Path) -> None:
    root = csv_dataset(tmp_path / "a", ["a.png,a red square", "sub/b.png,  spaced  "], images=("a.png", "sub/b.png"))
    assert find_dataset(root).format == "csv"
    records = load_records(root)
    assert [(r.path.name, r.text, r.repeats) for r in records] == [("a.png", "a red square", 1), ("b.png", "spaced", 1)]
    assert records[0].origin == "metadata.csv row 2"
    other = csv_dataset(tmp_path / "b", ["from the caption column,a.png,"], header="caption,file_name,extra")
    assert load_records(other)[0].text == "from the caption column"


def test_jsonl_like_hugging_face_imagefolder(tmp_path: Path) -> None:
    root = jsonl_dataset(tmp_path / "j", [{"file_name": "a.png", "text": "first"}, "",
                                          {"file_name": "b.png", "caption": "second", "score": 3}],
                         images=("a.png", "b.png"))
    assert find_dataset(root).format == "jsonl"
    assert [(r.path.name, r.text, r.origin) for r in load_records(root)] == [
        ("a.png", "first", "metadata.jsonl line 1"), ("b.png", "second", "metadata.jsonl line 3")]
    # Under train/ as well, like metadata.csv.
    nested = tmp_path / "n"
    png(nested / "train" / "a.png")
    (nested / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}))
    assert load_records(nested)[0].text == "x"


def test_txt_captions_beside_the_images(tmp_path: Path) -> None:
    root = txt_dataset(tmp_path / "t", {"b.png": "line one\nline two\n", "a.jpg": "a photo", "c.webp": "third"})
    (root / "orphan.txt").write_text("a caption without an image is ignored")
    (root / "._a.png").write_bytes(b"macOS resource fork, not an image")
    (root / "notes").mkdir()
    assert find_dataset(root).format == "txt"
    records = load_records(root)
    assert [(r.path.name, r.text) for r in records] == [("a.jpg", "a photo"), ("b.png", "line one line two"),
                                                        ("c.webp", "third")]


def test_kohya_repeat_folders_weight_the_images_and_name_uncaptioned_ones(tmp_path: Path) -> None:
    root = tmp_path / "k"
    txt_dataset(root / "3_sks dog", {"d1.png": "sks dog on grass", "d2.png": None})
    txt_dataset(root / "1_style", {"s1.png": "a painting"})
    assert find_dataset(root).format == "kohya"
    records = load_records(root)
    assert [(r.path.name, r.text, r.repeats) for r in records] == [
        ("s1.png", "a painting", 1), ("d1.png", "sks dog on grass", 3), ("d2.png", "sks dog", 3)]
    # One shuffled pass over 7 showings: each dog three times, the painting once.
    ds = CaptionedImages(records, seed=1, height=16, width=16, center_crop=True, random_flip=False,
                         samples_per_epoch=7)
    assert sorted(ds.record_index(SampleKey(0, p)) for p in range(7)) == [0, 1, 1, 1, 2, 2, 2]


def test_the_explicit_format_picks_one_of_two_and_auto_refuses_to_guess(tmp_path: Path) -> None:
    root = csv_dataset(tmp_path / "both", ["a.png,from csv"])
    (root / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "from jsonl"}))
    with pytest.raises(DatasetError, match="holds both metadata.csv and metadata.jsonl; remove one or set "
                                           r"--dataset_format \(spec.dataset.format\) to csv or jsonl"):
        load_records(root)
    assert load_records(root, dataset_format="jsonl")[0].text == "from jsonl"
    assert load_records(root, dataset_format="csv")[0].text == "from csv"
    with pytest.raises(DatasetError, match="no folder named <repeats>_<name>"):
        load_records(root, dataset_format="kohya")


# --- default caption and caption dropout -----------------------------------------------------------

def test_a_missing_caption_is_an_error_unless_a_default_is_given(tmp_path: Path) -> None:
    root = txt_dataset(tmp_path / "t", {"a.png": "has one", "b.png": None, "c.png": "   "})
    with pytest.raises(DatasetError, match=r"^b.png: no caption file b.txt beside it .*--default_caption"):
        load_records(root)
    assert [r.text for r in load_records(root, default_caption="a photo")] == ["has one", "a photo", "a photo"]
    assert [r.text for r in load_records(root, default_caption="")] == ["has one", "", ""]
    rows = csv_dataset(tmp_path / "c", ["a.png,", "a.png,fine"])
    with pytest.raises(DatasetError, match=r"metadata.csv row 2: empty caption; write one, or set --default_caption"):
        load_records(rows)
    assert [r.text for r in load_records(rows, default_caption="dflt")] == ["dflt", "fine"]


def _dropout(records, p: float) -> CaptionedImages:
    return CaptionedImages(records, seed=5, height=16, width=16, center_crop=False, random_flip=True,
                           samples_per_epoch=400, caption_dropout=p)


def test_caption_dropout_is_a_pure_function_of_seed_and_sample_and_leaves_crops_alone(tmp_path: Path) -> None:
    records = load_records(txt_dataset(tmp_path / "t", {f"{i}.png": f"caption {i}" for i in range(4)}))
    keys = [SampleKey(e, p) for e in range(2) for p in range(200)]
    dropped = [k for k in keys if _dropout(records, 0.3).caption_dropped(k)]
    assert 0.2 < len(dropped) / len(keys) < 0.4
    assert dropped == [k for k in keys if _dropout(records, 0.3).caption_dropped(k)]    # a resumed run agrees
    assert not any(_dropout(records, 0.0).caption_dropped(k) for k in keys)
    on, off = _dropout(records, 0.3), _dropout(records, 0.0)
    for key in keys[:20]:
        a, b = on[key], off[key]
        assert torch.equal(a["pixels"], b["pixels"]) and a["index"] == b["index"]
        assert a["text"] == ("" if key in dropped else b["text"])


def test_caption_flags_and_their_errors(make_cfg) -> None:
    cfg = make_cfg("--dataset_format", "kohya", "--caption_dropout", "0.1", "--default_caption", "",
                   "--max_image_pixels", "1000000")
    assert (cfg.dataset_format, cfg.caption_dropout, cfg.default_caption, cfg.max_image_pixels) == (
        "kohya", 0.1, "", 10**6)
    plain = make_cfg()
    assert (plain.dataset_format, plain.caption_dropout, plain.default_caption, plain.max_image_pixels) == (
        "auto", 0.0, None, contract.DEFAULT_MAX_IMAGE_PIXELS)
    with pytest.raises(ConfigError, match=r"--caption_dropout: must be a probability in \[0, 1\), got 1.0"):
        make_cfg("--caption_dropout", "1")
    with pytest.raises(ConfigError, match="--max_image_pixels: must be >= 1"):
        make_cfg("--max_image_pixels", "0")


def test_yaml_config_takes_the_dataset_keys(tmp_path: Path, toy_model: Path) -> None:
    root = txt_dataset(tmp_path / "t", {"a.png": None})
    config = tmp_path / "c.yaml"
    config.write_text(f"dataset_path: {root}\ndataset_format: txt\ndefault_caption: ''\ncaption_dropout: 0.25\n")
    cfg = parse_config(["--config", str(config), "--model_family", "flux", "--model_path", str(toy_model),
                        "--output_path", str(tmp_path / "o")], env={})
    assert (cfg.dataset_format, cfg.default_caption, cfg.caption_dropout) == ("txt", "", 0.25)


# --- hostile and broken datasets: refused by preflight, exit 65, the file or row named -----------------

def _preflight_exit(tmp_path: Path, toy_model: Path, dataset: Path, capsys: pytest.CaptureFixture[str],
                    *extra: str) -> tuple[int, str]:
    out = tmp_path / "out"
    code = run_cli(["--model_family", "flux", "--model_path", str(toy_model), "--dataset_path", str(dataset),
                    "--output_path", str(out), "--height", "16", "--width", "16", "--accelerator", "cpu", *extra])
    err = capsys.readouterr().err
    assert not out.exists(), "nothing may be written (or uploaded) for a refused dataset"
    return code, err


def _outside(tmp_path: Path) -> Path:
    return png(tmp_path / "elsewhere" / "secret.png")


def _traversal(tmp_path: Path) -> Path:
    _outside(tmp_path)
    return csv_dataset(tmp_path / "ds", ["a.png,ok", "../../elsewhere/secret.png,x"])


def _absolute(tmp_path: Path) -> Path:
    return csv_dataset(tmp_path / "ds", [f"{_outside(tmp_path)},x"])


def _symlinked_image(tmp_path: Path) -> Path:
    root = csv_dataset(tmp_path / "ds", ["a.png,ok", "link.png,x"])
    (root / "train" / "link.png").symlink_to(_outside(tmp_path))
    return root


def _symlinked_txt_image(tmp_path: Path) -> Path:
    root = txt_dataset(tmp_path / "ds", {"a.png": "ok"})
    (root / "b.png").symlink_to(_outside(tmp_path))
    (root / "b.txt").write_text("x")
    return root


def _symlinked_caption(tmp_path: Path) -> Path:
    root = txt_dataset(tmp_path / "ds", {"a.png": None})
    (tmp_path / "private.txt").write_text("not for training")
    (root / "a.txt").symlink_to(tmp_path / "private.txt")
    return root


def _symlinked_kohya_folder(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    txt_dataset(root / "1_ok", {"a.png": "ok"})
    _outside(tmp_path)
    (root / "5_linked").symlink_to(tmp_path / "elsewhere")
    return root


def _symlinked_metadata(tmp_path: Path) -> Path:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}))
    root = tmp_path / "ds"
    png(root / "a.png")
    (root / "metadata.jsonl").symlink_to(tmp_path / "elsewhere" / "metadata.jsonl")
    return root


def _missing(tmp_path: Path) -> Path:
    return csv_dataset(tmp_path / "ds", ["a.png,ok", "gone.png,x"])


def _corrupt(tmp_path: Path) -> Path:
    root = csv_dataset(tmp_path / "ds", ["a.png,ok", "junk.png,x"])
    (root / "train" / "junk.png").write_bytes(b"<html>404 not found</html>")
    return root


def _truncated_png(tmp_path: Path) -> Path:
    root = csv_dataset(tmp_path / "ds", ["a.png,ok", "cut.png,x"])
    data = (root / "train" / "a.png").read_bytes()
    (root / "train" / "cut.png").write_bytes(data[: len(data) - 20])
    return root


def _truncated_jpeg(tmp_path: Path) -> Path:
    root = txt_dataset(tmp_path / "ds", {"a.png": "ok"})
    data = jpeg_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])
    (root / "cut.txt").write_text("x")
    return root


def _bomb(tmp_path: Path) -> Path:
    root = jsonl_dataset(tmp_path / "ds", [{"file_name": "a.png", "text": "ok"},
                                           {"file_name": "bomb.png", "text": "x"}])
    (root / "bomb.png").write_bytes(png_claiming(30_000, 30_000))
    return root


def _no_columns(tmp_path: Path) -> Path:
    return csv_dataset(tmp_path / "ds", ["a.png,x"], header="image,prompt")


def _no_rows(tmp_path: Path) -> Path:
    return csv_dataset(tmp_path / "ds", [])


def _no_jsonl_lines(tmp_path: Path) -> Path:
    return jsonl_dataset(tmp_path / "ds", ["", "   "])


def _caption_not_text(tmp_path: Path) -> Path:
    return jsonl_dataset(tmp_path / "ds", [{"file_name": "a.png", "text": "ok"}, {"file_name": "a.png", "text": 42}])


def _caption_null(tmp_path: Path) -> Path:
    return jsonl_dataset(tmp_path / "ds", [{"file_name": "a.png", "caption": None}])


def _bad_json(tmp_path: Path) -> Path:
    return jsonl_dataset(tmp_path / "ds", [{"file_name": "a.png", "text": "ok"}, '{"file_name": "a.png", text: x}'])


def _jsonl_not_an_object(tmp_path: Path) -> Path:
    return jsonl_dataset(tmp_path / "ds", [["a.png", "x"]])


def _jsonl_without_file_name(tmp_path: Path) -> Path:
    return jsonl_dataset(tmp_path / "ds", [{"image": "a.png", "text": "x"}])


def _caption_not_utf8(tmp_path: Path) -> Path:
    root = txt_dataset(tmp_path / "ds", {"a.png": None})
    (root / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    return root


def _kohya_folder_without_count(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    txt_dataset(root / "10_cats", {"a.png": "cat"})
    txt_dataset(root / "dogs", {"b.png": "dog"})
    return root


def _kohya_zero_repeats(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    txt_dataset(root / "0_cats", {"a.png": "cat"})
    return root


def _kohya_loose_image(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    txt_dataset(root / "2_cats", {"a.png": "cat"})
    png(root / "stray.png")
    return root


HOSTILE = {
    "path traversal": (_traversal, r"metadata.csv row 3: file_name '../../elsewhere/secret.png' points outside "
                                   r"the dataset folder"),
    "absolute path": (_absolute, r"metadata.csv row 2: file_name '/.*secret.png' is an absolute path"),
    "symlinked image (csv)": (_symlinked_image, r"metadata.csv row 3: file_name 'link.png' points outside"),
    "symlinked image (txt)": (_symlinked_txt_image, r"b.png: image 'b.png' points outside"),
    "symlinked caption": (_symlinked_caption, r"a.png: caption file 'a.txt' points outside"),
    "symlinked kohya folder": (_symlinked_kohya_folder, r"5_linked/secret.png: image '5_linked/secret.png' points "
                                                        r"outside"),
    "symlinked metadata": (_symlinked_metadata, r"metadata.jsonl links outside the dataset folder"),
    "missing image": (_missing, r"metadata.csv row 3: image 'gone.png' not found"),
    "corrupt image": (_corrupt, r"metadata.csv row 3: junk.png is not a readable image"),
    "truncated png": (_truncated_png, r"metadata.csv row 3: cut.png is not a readable image"),
    "truncated jpeg": (_truncated_jpeg, r"cut.jpg: cut.jpg is a truncated JPEG \(no end-of-image marker\)"),
    "decompression bomb": (_bomb, r"metadata.jsonl line 2: bomb.png is 30000x30000 = 900000000 pixels, more than "
                                  r"the limit of 178956970 .*raise --max_image_pixels"),
    "csv without the columns": (_no_columns, r"metadata.csv: missing column\(s\) file_name, text or caption; "
                                             r"expected file_name and text or caption, found image,prompt"),
    "csv with no rows": (_no_rows, r"metadata.csv: no rows; add one line per image as file_name,text"),
    "jsonl with no lines": (_no_jsonl_lines, r"metadata.jsonl: no rows"),
    "caption not text": (_caption_not_text, r"metadata.jsonl line 2: the caption is int 42, not text"),
    "caption null": (_caption_null, r"metadata.jsonl line 1: empty caption; write one, or set --default_caption"),
    "invalid json line": (_bad_json, r"metadata.jsonl line 2: not valid JSON"),
    "jsonl line not an object": (_jsonl_not_an_object, r"metadata.jsonl line 1: a JSON list, not an object"),
    "jsonl without file_name": (_jsonl_without_file_name, r"metadata.jsonl line 1: missing column\(s\) file_name; "
                                                          r"expected file_name and text or caption, found image,text"),
    "caption not utf-8": (_caption_not_utf8, r"a.png: caption file a.txt is not UTF-8 text"),
    "kohya folder without a count": (_kohya_folder_without_count, r"dogs/: images in a folder without a repeat "
                                                                  r"count; rename it to 1_dogs"),
    "kohya zero repeats": (_kohya_zero_repeats, r"0_cats/: the repeat count must be at least 1"),
    "kohya loose image": (_kohya_loose_image, r"stray.png: an image beside the <repeats>_<name> folders"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_or_broken_dataset_fails_preflight_with_exit_65_naming_it(
        case: str, tmp_path: Path, toy_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build, message = HOSTILE[case]
    code, err = _preflight_exit(tmp_path, toy_model, build(tmp_path), capsys)
    assert code == contract.EXIT_DATASET_ERROR, err
    # The one line the operator quotes into the job's status (failures.py, reason InvalidDataset).
    assert f"{contract.PREFLIGHT_FAILED}: dataset: " in err
    assert re.search(message, err), err


def test_the_pixel_limit_is_configurable(tmp_path: Path, toy_model: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)     # restored after the test
    root = csv_dataset(tmp_path / "ds", ["a.png,ok", "big.png,x"])
    png(root / "train" / "big.png", size=(300, 200))
    code, err = _preflight_exit(tmp_path, toy_model, root, capsys, "--max_image_pixels", "50000")
    assert code == contract.EXIT_DATASET_ERROR
    assert "metadata.csv row 3: big.png is 300x200 = 60000 pixels, more than the limit of 50000" in err
    # A limit above Pillow's own refusal threshold is honoured: the bomb-sized header passes the check.
    (root / "train" / "big.png").write_bytes(png_claiming(20_000, 10_000))
    load_records(root, max_pixels=200_000_000)
    assert Image.MAX_IMAGE_PIXELS == 200_000_000


def test_a_jpeg_with_data_after_its_end_marker_is_complete(tmp_path: Path) -> None:
    """Phones append data after EOI; the check looks for the marker after the scan starts."""
    root = txt_dataset(tmp_path / "t", {"a.png": "ok"})
    (root / "b.jpg").write_bytes(jpeg_bytes() + b"trailer appended by a camera" * 10)
    (root / "b.txt").write_text("b")
    assert [r.path.name for r in load_records(root)] == ["a.png", "b.jpg"]


def test_a_folder_with_no_dataset_names_every_format(tmp_path: Path, toy_model: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "readme.md").write_text("no images")
    code, err = _preflight_exit(tmp_path, toy_model, tmp_path / "ds", capsys)
    assert code == contract.EXIT_PREFLIGHT_DATASET
    for expected in ("train/metadata.csv", "metadata.jsonl", ".txt captions", "<repeats>_<name>"):
        assert expected in err


def test_ranks_after_preflight_list_records_without_reopening_images(tmp_path: Path) -> None:
    root = csv_dataset(tmp_path / "ds", ["a.png,ok", "junk.png,x"])
    (root / "train" / "junk.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError):
        load_records(root)
    # What a training process does when its pod's preflight read every image already.
    assert len(load_records(root, verify_images=False)) == 2


def test_cached_latents_hold_the_empty_caption_that_dropout_trains_on(make_cfg, toy_model: Path, dataset: Path,
                                                                       tmp_path: Path) -> None:
    cfg = make_cfg("--cache_latents", "--center_crop", "--caption_dropout", "0.5")
    family = ToyFamily()
    pipe = family.load_pipeline(toy_model, torch.float32)
    records = load_records(dataset)
    folder = tmp_path / "cache"
    build_cache(family, pipe, records, cfg, folder, device=torch.device("cpu"), dtype=torch.float32, rank=0,
                world_size=1, barrier=lambda: None)
    assert empty_caption_file(folder).is_file()
    common = dict(seed=cfg.seed, height=16, width=16, center_crop=True, random_flip=False, samples_per_epoch=20,
                  caption_dropout=0.5)
    cached, plain = CachedCaptions(records, folder, **common), CaptionedImages(records, **common)
    texts = []
    for position in range(20):
        key = SampleKey(0, position)
        item = cached[key]
        assert item["text"] == plain[key]["text"]
        expected = family.encode_prompts(pipe, [item["text"]], torch.device("cpu"))
        assert all(torch.allclose(item["cond"][k], v[0]) for k, v in expected.items()), position
        texts.append(item["text"])
    assert "" in texts and set(texts) - {""}


# --- exact resume with repeats, dropout and default captions -------------------------------------

@pytest.mark.parametrize("cached", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_kohya_dataset_with_caption_dropout_resumes_bit_identically(tmp_path: Path, toy_model: Path,
                                                                    cached: bool) -> None:
    root = tmp_path / "k"
    txt_dataset(root / "2_red", {"r1.png": "red one", "r2.png": None})
    txt_dataset(root / "1_blue", {"b1.png": "blue one"})

    def cfg(out: str, *extra: str):
        return parse_config(["--model_family", "flux", "--model_path", str(toy_model), "--dataset_path", str(root),
                             "--output_path", str(tmp_path / out), "--height", "16", "--width", "16", "--precision",
                             "32", "--steps_per_epoch", "3", "--max_epochs", "2", "--batch_size", "2",
                             "--checkpoint_every_n_steps", "2", "--output_formats", "diffusers",
                             "--validation_inference_steps", "1", "--caption_dropout", "0.5", "--random_flip",
                             *(("--cache_latents", "--center_crop") if cached else ()), *extra], env={})

    whole_family = ToyFamily()
    whole = run(cfg("whole"), env={}, family=whole_family)
    assert "" in whole_family.prompts_seen and "red" in whole_family.prompts_seen     # dropped, and the folder name
    assert_toy_run_resumes_bit_identically(whole, cfg("whole"), cfg("cut"), crash_step=3)
    if cached:
        return
    without = run(cfg("plain", "--caption_dropout", "0"), env={}, family=ToyFamily())
    assert any(not torch.equal(t, without.final_lora[k]) for k, t in whole.final_lora.items())
